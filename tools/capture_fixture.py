#!/usr/bin/env python3
"""Capture the sysfs/procfs files tierd reads from a live machine (host or guest) into a fixture tree.

    python3 tools/capture_fixture.py NAME [--out tests/fixtures] [--sys /sys] [--proc /proc] [--max-blocks 32]

writes tests/fixtures/NAME/ (replacing it):

    NAME/sys/...      paths relative to /sys, e.g. NAME/sys/devices/system/node/node0/meminfo
    NAME/proc/sys/kernel/numa_balancing ...
    NAME/CAPTURE.txt  kernel version, date, topology (TIERD_GUEST_TOPOLOGY or "host"), what was skipped and why

Conventions (code under test opens the fixture with ``SysFS("tests/fixtures/NAME/sys")``):

- Regular files are copied byte for byte as the kernel returned them (trailing newline kept).
- Symlinks are reproduced as symlinks with the kernel's own relative target, placed where the kernel has them.
  Every sysfs symlink is relative, so the same target works inside the fixture: ``bus/cxl/devices/region0``
  points into ``devices/platform/.../region0`` exactly as on the machine, ``devices/system/node/node0/memory5`` ->
  ``../../memory/memory5``, ``devices/system/memory/memory5/node0`` -> ``../node/node0``,
  ``nodeN/access0/initiators/node0`` -> ``../../../node0``, ``bus/dax/devices/dax0.0/driver`` ->
  ``.../bus/dax/drivers/kmem``. A link's target directory is created (empty if nothing in it is captured) so links
  resolve and ``readlink``/``realpath``/``is_dir`` behave as on the machine.
- Files are read through the link path but stored at their resolved (real) location, once.
- Unreadable files (permission denied, write-only attributes, EIO) are skipped and listed in CAPTURE.txt.
- Memory blocks: at most --max-blocks per node (lowest indices) so a big host stays a few hundred files; the
  omission is listed in CAPTURE.txt. Node meminfo still gives the true capacity.

Nothing here writes to /sys or /proc; reading ``create_ram_region`` only reports the next free region name.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Globs relative to /sys. Directories matched are created; files copied; symlinks reproduced.
SYS_GLOBS: tuple[str, ...] = (
    "devices/system/node/possible",
    "devices/system/node/online",
    "devices/system/node/has_cpu",
    "devices/system/node/has_memory",
    "devices/system/node/has_normal_memory",
    "devices/system/node/has_generic_initiator",
    "devices/system/node/node*/cpulist",
    "devices/system/node/node*/meminfo",
    "devices/system/node/node*/distance",
    "devices/system/node/node*/vmstat",
    "devices/system/node/node*/numastat",
    "devices/system/node/node*/access*/initiators/*",
    "devices/system/node/node*/access*/targets/*",
    "devices/system/node/node*/memory_side_cache/*",
    "devices/system/node/node*/memory_side_cache/index*/*",
    "devices/system/memory/block_size_bytes",
    "devices/system/memory/auto_online_blocks",
    "devices/virtual/memory_tiering/memory_tier*/nodelist",
    "devices/virtual/memory_tiering/memory_tier*/abstract_distance",
    "kernel/mm/numa/demotion_enabled",
    "kernel/mm/transparent_hugepage/enabled",
    "kernel/mm/transparent_hugepage/defrag",
    "bus/cxl/devices/region*/mode",
    "bus/cxl/devices/region*/size",
    "bus/cxl/devices/region*/resource",
    "bus/cxl/devices/region*/interleave_ways",
    "bus/cxl/devices/region*/interleave_granularity",
    "bus/cxl/devices/region*/target*",
    "bus/cxl/devices/region*/commit",
    "bus/cxl/devices/region*/driver",
    "bus/cxl/devices/region*/access*/*",
    "bus/cxl/devices/region*/dax_region*/dax*.*/target_node",
    "bus/cxl/devices/mem*/numa_node",
    "bus/cxl/devices/mem*/serial",
    "bus/cxl/devices/mem*/ram/size",
    "bus/cxl/devices/mem*/pmem/size",
    "bus/cxl/devices/mem*/driver",
    "bus/cxl/devices/endpoint*/uport",  # the memdev behind an endpoint port (decoder paths do not name it)
    "bus/cxl/devices/decoder*/mode",
    "bus/cxl/devices/decoder*/size",
    "bus/cxl/devices/decoder*/start",
    "bus/cxl/devices/decoder*/dpa_size",
    "bus/cxl/devices/decoder*/dpa_resource",
    "bus/cxl/devices/decoder*/interleave_ways",
    "bus/cxl/devices/decoder*/interleave_granularity",
    "bus/cxl/devices/decoder*/target_list",
    "bus/cxl/devices/decoder*/target_type",
    "bus/cxl/devices/decoder*/cap_ram",
    "bus/cxl/devices/decoder*/cap_pmem",
    "bus/cxl/devices/decoder*/locked",
    "bus/cxl/devices/decoder*/region",
    "bus/dax/devices/dax*/target_node",
    "bus/dax/devices/dax*/numa_node",
    "bus/dax/devices/dax*/size",
    "bus/dax/devices/dax*/resource",
    "bus/dax/devices/dax*/driver",
)
BLOCK_FILES = ("state", "online_type", "valid_zones", "removable", "phys_index", "phys_device")
PROC_FILES = (
    "sys/kernel/numa_balancing",
    "sys/kernel/numa_balancing_promote_rate_limit_MBps",
    "sys/vm/zone_reclaim_mode",
)

_MEMORY_RE = re.compile(r"^memory(\d+)$")
_NODE_RE = re.compile(r"^node(\d+)$")


class Capture:
    """Copies entries from a live tree (``src``) into a fixture tree (``dst``), following the conventions above."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src = src
        self.dst = dst
        self.files = 0
        self.links = 0
        self.skipped: list[str] = []
        self._done: set[str] = set()

    def _resolve_into(self, rel: str) -> str | None:
        """Walk ``rel`` component by component, reproducing every symlink met; return the real relative path."""
        resolved = ""
        for comp in [c for c in rel.split("/") if c]:
            cand = f"{resolved}/{comp}" if resolved else comp
            live = self.src / cand
            if live.is_symlink():
                self._link(cand)
                real = os.path.realpath(live)
                try:
                    resolved = os.path.relpath(real, os.path.realpath(self.src))
                except ValueError:
                    return None
                if resolved.startswith(".."):
                    return None  # points outside the tree
            else:
                resolved = cand
        return resolved

    def _link(self, rel_real_parent: str) -> None:
        """Reproduce the symlink at ``rel_real_parent`` (its parent already resolved) and create its target dir."""
        if rel_real_parent in self._done:
            return
        self._done.add(rel_real_parent)
        live = self.src / rel_real_parent
        target = os.readlink(live)
        out = self.dst / rel_real_parent
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_symlink() or out.exists():
            return
        os.symlink(target, out)
        self.links += 1
        real = os.path.realpath(live)
        root = os.path.realpath(self.src)
        if os.path.commonpath([real, root]) == root and os.path.isdir(real):
            rel_target = os.path.relpath(real, root)
            # the target may itself lie under links: resolve and create its real directory
            resolved = self._resolve_into(rel_target)
            if resolved is not None:
                (self.dst / resolved).mkdir(parents=True, exist_ok=True)

    def entry(self, rel: str) -> None:
        """Capture one file, directory or symlink given by its path relative to the live root."""
        live = self.src / rel
        if live.is_symlink():
            parent = self._resolve_into(os.path.dirname(rel)) if os.path.dirname(rel) else ""
            if parent is None:
                return
            self._link(f"{parent}/{live.name}" if parent else live.name)
            return
        resolved = self._resolve_into(rel)
        if resolved is None or resolved in self._done:
            return
        self._done.add(resolved)
        if live.is_dir():
            (self.dst / resolved).mkdir(parents=True, exist_ok=True)
            return
        try:
            with open(live, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return  # not on this kernel: nothing to note
        except OSError as e:
            self.skipped.append(f"{rel}: {e.strerror or e}")
            return
        out = self.dst / resolved
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        self.files += 1

    def glob(self, pattern: str) -> None:
        for live in sorted(glob.glob(str(self.src / pattern))):
            self.entry(os.path.relpath(live, self.src))


def _block_index(name: str) -> int:
    m = _MEMORY_RE.match(name)
    return int(m.group(1)) if m else -1


def capture_memory_blocks(cap: Capture, max_blocks: int, notes: list[str]) -> None:
    """Per node: the ``memoryN`` links in the node dir, and for each block its files and its ``nodeN`` link."""
    node_dir = cap.src / "devices/system/node"
    for node in sorted(os.listdir(node_dir)) if node_dir.is_dir() else []:
        if not _NODE_RE.match(node):
            continue
        blocks = sorted((b for b in os.listdir(node_dir / node) if _MEMORY_RE.match(b)), key=_block_index)
        if len(blocks) > max_blocks:
            notes.append(f"{node}: captured {max_blocks} of {len(blocks)} memory blocks (lowest indices)")
            blocks = blocks[:max_blocks]
        for b in blocks:
            cap.entry(f"devices/system/node/{node}/{b}")
            for f in BLOCK_FILES:
                cap.entry(f"devices/system/memory/{b}/{f}")
            for link in sorted(os.listdir(cap.src / "devices/system/memory" / b)):
                if _NODE_RE.match(link):
                    cap.entry(f"devices/system/memory/{b}/{link}")
    mem_dir = cap.src / "devices/system/memory"
    orphans = [b for b in (os.listdir(mem_dir) if mem_dir.is_dir() else [])
               if _MEMORY_RE.match(b) and not any(_NODE_RE.match(e) for e in os.listdir(mem_dir / b))]
    if orphans:
        notes.append(f"{len(orphans)} memory blocks belong to no node: not captured")


def capture(name: str, out_root: Path, sys_root: Path, proc_root: Path, max_blocks: int) -> Path:
    dest = out_root / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    notes: list[str] = []

    cap = Capture(sys_root, dest / "sys")
    for pattern in SYS_GLOBS:
        cap.glob(pattern)
    capture_memory_blocks(cap, max_blocks, notes)

    pcap = Capture(proc_root, dest / "proc")
    for rel in PROC_FILES:
        if (proc_root / rel).exists():
            pcap.entry(rel)

    topology = os.environ.get("TIERD_GUEST_TOPOLOGY") or "host"
    lines = [
        f"fixture: {name}",
        f"captured: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}",
        f"kernel: {platform.release()} ({platform.version()})",
        f"machine: {platform.machine()}",
        f"topology: {topology}",
        "tool: tools/capture_fixture.py (conventions in its docstring: symlinks kept relative, targets created)",
        f"files: {cap.files + pcap.files}, symlinks: {cap.links + pcap.links}",
    ]
    online = sys_root / "devices/system/node/online"
    if online.exists():
        lines.append(f"nodes online: {online.read_text().strip()}")
    lines += [f"note: {n}" for n in notes]
    lines += [f"skipped (unreadable): {s}" for s in cap.skipped + pcap.skipped]
    (dest / "CAPTURE.txt").write_text("\n".join(lines) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("name", help="fixture name, e.g. host-1node or guest-tiered")
    p.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    p.add_argument("--sys", dest="sys_root", type=Path, default=Path("/sys"))
    p.add_argument("--proc", dest="proc_root", type=Path, default=Path("/proc"))
    p.add_argument("--max-blocks", type=int, default=32, help="memory blocks per node (default 32)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        p.error("name: letters, digits, '.', '_', '-' only")
    dest = capture(args.name, args.out, args.sys_root, args.proc_root, args.max_blocks)
    n = sum(1 for _ in dest.rglob("*"))
    print(f"{dest}: {n} entries; see {dest / 'CAPTURE.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
