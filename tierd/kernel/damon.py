"""The DAMON sysfs door: /sys/kernel/mm/damon/admin read and written through ``SysFS``. It decides nothing.

Files (relative to the sysfs root; K is a kdamond index, S a scheme index, T a target index)::

    kernel/mm/damon/admin/kdamonds/nr_kdamonds          writing N recreates every kdamond directory (EBUSY while
                                                         any kdamond runs)
    kernel/mm/damon/admin/kdamonds/K/state               on | off; commands: on, off, commit,
                                                         update_schemes_tried_regions, clear_schemes_tried_regions
    kernel/mm/damon/admin/kdamonds/K/pid                 the kdamond thread's pid, -1 while off
    .../K/contexts/nr_contexts                           0 or 1 (sysfs supports one context per kdamond)
    .../K/contexts/0/{operations,avail_operations}       vaddr | fvaddr | paddr
    .../K/contexts/0/monitoring_attrs/intervals/{sample_us,aggr_us,update_us}
    .../K/contexts/0/monitoring_attrs/nr_regions/{min,max}
    .../K/contexts/0/targets/nr_targets, T/pid_target, T/regions/nr_regions, T/regions/R/{start,end}
    .../K/contexts/0/schemes/nr_schemes
    .../K/contexts/0/schemes/S/{action,apply_interval_us,target_nid}
    .../S/access_pattern/{sz,nr_accesses,age}/{min,max}  the max values default to 0: raise them or nothing matches
    .../S/quotas/{ms,bytes,reset_interval_ms}, quotas/weights/{sz,nr_accesses,age}_permil
    .../S/watermarks/{metric,interval_us,high,mid,low}
    .../S/filters/nr_filters, filters/F/{type,matching,damon_target_idx,memcg_path,addr_start,addr_end}
                                                         (``core_filters`` on kernels that have it, 6.15+)
    .../S/tried_regions/N/{start,end,nr_accesses,age}    filled by update_schemes_tried_regions; N counts across
                                                         the kdamond's schemes on 6.12, so list the directory
    .../S/stats/{nr_tried,sz_tried,nr_applied,sz_applied,qt_exceeds}
                                                         cumulative since the scheme was set up; the files show
                                                         the kernel's counters as of the last update_schemes_stats

Kernel facts this layer relies on (verified on Debian's 6.12 in the guest):

- Every write to an ``nr_*`` file recreates the directories below it with kernel defaults.
- ``on`` fails with EINVAL when a target pid does not exist; ``off`` on a stopped kdamond fails with EPERM;
  ``commit`` and ``update_schemes_tried_regions`` on a stopped kdamond fail with EINVAL.
- ``commit`` naming a pid that no longer exists returns success but the kdamond stops: read ``state`` after it.
- ``commit`` and ``update_schemes_tried_regions`` block until the kdamond has handled them (about one
  aggregation interval).
- A vaddr kdamond stops by itself when every target process has exited.

Pure parse/format helpers are separate from I/O; ``DamonFS`` does the I/O. Errors are typed and carry an
operator-readable reason and, where a kernel feature is missing, the Linux version that brought it.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from tierd.errors import EX_UNAVAILABLE, TierdError
from tierd.kernel.fs import ReadFailure, SysFS

log = logging.getLogger(__name__)

ADMIN = "kernel/mm/damon/admin"
KDAMONDS = f"{ADMIN}/kdamonds"
#: A read that finds DAMON's sysfs mutex taken is tried this often, this far apart (about one aggregation interval).
BUSY_READ_ATTEMPTS = 20
BUSY_READ_WAIT_S = 0.01
_EBUSY_REASON = os.strerror(errno.EBUSY)
NR_KDAMONDS = f"{KDAMONDS}/nr_kdamonds"

#: Kernel modules that run kdamonds of their own, outside the sysfs admin tree. While one runs, sysfs ``on``
#: fails with EBUSY (they start their contexts exclusively).
MODULE_USERS = ("damon_reclaim", "damon_lru_sort", "damon_stat")


def module_enabled_file(module: str) -> str:
    """A DAMON module's ``enabled`` parameter, relative to /sys (Y while its kdamond runs)."""
    return f"module/{module}/parameters/enabled"

#: Largest values the access-pattern files take (unsigned long for sizes, unsigned int for counts and ages).
ULONG_MAX = 2**64 - 1
UINT_MAX = 2**32 - 1

HINT_SYSFS = "the DAMON sysfs interface needs Linux 5.18+ built with CONFIG_DAMON_SYSFS"
HINT_VADDR = "virtual-address monitoring needs CONFIG_DAMON_VADDR"
HINT_PADDR = "physical-address monitoring needs CONFIG_DAMON_PADDR"
HINT_TRIED_REGIONS = "update_schemes_tried_regions needs Linux 6.2+"
HINT_TARGET_FILTER = "DAMOS filters of type 'target' need Linux 6.6+"
HINT_MIGRATE = "DAMOS migrate_hot/migrate_cold need Linux 6.11+"


# ---- errors ---------------------------------------------------------------------------------------------------


class DamonError(TierdError):
    """DAMON could not be used as asked. ``reason`` is operator-readable; ``hint`` names a kernel requirement."""

    def __init__(self, reason: str, hint: str = "") -> None:
        self.reason = reason
        self.hint = hint
        super().__init__(f"{reason} ({hint})" if hint else reason)


class DamonUnavailable(DamonError):
    """This kernel (or this user) cannot use DAMON at all: no sysfs interface, no vaddr operations, not root."""

    exit_code = EX_UNAVAILABLE


class DamonBusy(DamonError):
    """DAMON is in use by someone else (a kdamond tierd did not create, a DAMON module); tierd leaves it alone."""

    exit_code = EX_UNAVAILABLE


class DamonWriteFailed(DamonError):
    """The kernel refused a write. ``path`` is relative to the sysfs root; ``errno`` as the kernel returned it."""

    def __init__(self, path: str, value: str, errno_: int, hint: str = "") -> None:
        self.path = path
        self.value = value
        self.errno = errno_
        super().__init__(f"writing {value!r} to {path}: {os.strerror(errno_)}", hint)


class DamonReadFailed(DamonError):
    """A DAMON file could not be read or parsed."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}")


# ---- values ---------------------------------------------------------------------------------------------------


class Command(StrEnum):
    """What can be written to a kdamond's ``state`` file."""

    ON = "on"
    OFF = "off"
    COMMIT = "commit"
    UPDATE_TRIED_REGIONS = "update_schemes_tried_regions"
    CLEAR_TRIED_REGIONS = "clear_schemes_tried_regions"
    UPDATE_STATS = "update_schemes_stats"


class Ops(StrEnum):
    VADDR = "vaddr"
    FVADDR = "fvaddr"
    PADDR = "paddr"


@dataclass(frozen=True, slots=True)
class KdamondState:
    """``state`` and ``pid`` of one kdamond. ``pid`` is None while it is off."""

    index: int
    running: bool
    pid: int | None


@dataclass(frozen=True, slots=True)
class KdamondInfo:
    """One kdamond as the admin tree shows it. ``ops`` is None when it has no context yet."""

    index: int
    running: bool
    pid: int | None
    ops: str | None
    avail_ops: frozenset[str]
    nr_targets: int
    nr_schemes: int


@dataclass(frozen=True, slots=True)
class MonitoringAttrs:
    sample_us: int
    aggr_us: int
    update_us: int
    min_nr_regions: int
    max_nr_regions: int


@dataclass(frozen=True, slots=True)
class AccessPattern:
    """Which regions a scheme applies to; every range is inclusive. ``age`` counts aggregation intervals."""

    sz_bytes: tuple[int, int] = (0, ULONG_MAX)
    nr_accesses: tuple[int, int] = (0, UINT_MAX)
    age: tuple[int, int] = (0, UINT_MAX)


@dataclass(frozen=True, slots=True)
class Quotas:
    ms: int = 0
    bytes: int = 0
    reset_interval_ms: int = 0
    sz_permil: int = 0
    nr_accesses_permil: int = 0
    age_permil: int = 0


@dataclass(frozen=True, slots=True)
class Watermarks:
    metric: str = "none"  # none | free_mem_rate
    interval_us: int = 0
    high: int = 0
    mid: int = 0
    low: int = 0


@dataclass(frozen=True, slots=True)
class SchemeFilter:
    """A DAMOS filter. ``matching`` True filters out memory that matches ``type`` (and its argument); False
    filters out memory that does not: ``SchemeFilter("target", matching=False, target_idx=2)`` keeps only target
    2's regions."""

    type: str  # anon | memcg | addr | target (| young, hugepage_size, unmapped on newer kernels)
    matching: bool
    target_idx: int | None = None
    memcg_path: str | None = None
    addr_range: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Scheme:
    """A DAMOS scheme. None fields keep the kernel's default (quotas and watermarks off)."""

    action: str  # stat | pageout | migrate_hot | migrate_cold | ...
    access_pattern: AccessPattern = AccessPattern()
    quotas: Quotas | None = None
    watermarks: Watermarks | None = None
    filters: tuple[SchemeFilter, ...] = ()
    apply_interval_us: int | None = None
    target_nid: int | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """A monitoring target: a pid (vaddr) and/or explicit regions [start, end) (paddr needs them)."""

    pid: int | None = None
    regions: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Context:
    ops: str
    attrs: MonitoringAttrs
    targets: tuple[Target, ...] = ()
    schemes: tuple[Scheme, ...] = ()


@dataclass(frozen=True, slots=True)
class TriedRegion:
    """One region a scheme was tried on at the last aggregation. ``age`` counts aggregation intervals."""

    start: int
    end: int
    nr_accesses: int
    age: int

    @property
    def size_bytes(self) -> int:
        return self.end - self.start


# ---- paths ----------------------------------------------------------------------------------------------------


def kdamond_dir(k: int) -> str:
    return f"{KDAMONDS}/{k}"


def context_dir(k: int) -> str:
    return f"{KDAMONDS}/{k}/contexts/0"


def scheme_dir(k: int, s: int) -> str:
    return f"{context_dir(k)}/schemes/{s}"


# ---- pure parsers ---------------------------------------------------------------------------------------------


def parse_state(text: str) -> bool:
    """``on`` -> True, ``off`` -> False. Raises ValueError on anything else."""
    t = text.strip()
    if t == "on":
        return True
    if t == "off":
        return False
    raise ValueError(f"expected 'on' or 'off', got {t[:20]!r}")


def parse_pid(text: str) -> int | None:
    """A kdamond's ``pid`` file: None for -1 (not running). Raises ValueError."""
    v = int(text.strip())
    return None if v < 0 else v


def parse_avail_operations(text: str) -> frozenset[str]:
    """``avail_operations``: one name per line (``vaddr\\nfvaddr\\npaddr``)."""
    return frozenset(text.split())


def parse_tried_region(start: str, end: str, nr_accesses: str, age: str) -> TriedRegion:
    """The four files of one tried region. Raises ValueError (also on end <= start)."""
    r = TriedRegion(int(start), int(end), int(nr_accesses), int(age))
    if r.end <= r.start:
        raise ValueError(f"empty region [{r.start:#x}, {r.end:#x})")
    return r


def parse_stat_cpu_ticks(text: str) -> int:
    """utime + stime (fields 14 and 15 of /proc/PID/stat), in clock ticks. Raises ValueError."""
    close_i = text.rfind(")")
    if close_i < 0:
        raise ValueError("no '(comm)' field")
    rest = text[close_i + 1 :].split()
    # rest[0] is field 3; field N is rest[N - 3]
    if len(rest) < 13:
        raise ValueError(f"only {len(rest) + 2} fields")
    return int(rest[11]) + int(rest[12])


def _yn(v: bool) -> str:
    return "Y" if v else "N"


# ---- pure formatters: the ordered writes for a configuration ---------------------------------------------------


def attrs_writes(ctx: str, a: MonitoringAttrs) -> list[tuple[str, str]]:
    m = f"{ctx}/monitoring_attrs"
    # the kernel checks min <= max at commit/on, not per file, so the order of these writes does not matter
    return [
        (f"{m}/intervals/sample_us", str(a.sample_us)),
        (f"{m}/intervals/aggr_us", str(a.aggr_us)),
        (f"{m}/intervals/update_us", str(a.update_us)),
        (f"{m}/nr_regions/min", str(a.min_nr_regions)),
        (f"{m}/nr_regions/max", str(a.max_nr_regions)),
    ]


def targets_writes(ctx: str, targets: Sequence[Target]) -> list[tuple[str, str]]:
    """``nr_targets`` first (the kernel then creates the target directories), then each target."""
    out = [(f"{ctx}/targets/nr_targets", str(len(targets)))]
    for i, t in enumerate(targets):
        d = f"{ctx}/targets/{i}"
        if t.pid is not None:
            out.append((f"{d}/pid_target", str(t.pid)))
        if t.regions:
            out.append((f"{d}/regions/nr_regions", str(len(t.regions))))
            for j, (start, end) in enumerate(t.regions):
                out += [(f"{d}/regions/{j}/start", str(start)), (f"{d}/regions/{j}/end", str(end))]
    return out


def scheme_writes(sd: str, s: Scheme, filters_dir: str = "filters") -> list[tuple[str, str]]:
    """The writes configuring one (freshly created) scheme directory ``sd``."""
    out = [(f"{sd}/action", s.action)]
    p = s.access_pattern
    for name, (lo, hi) in (("sz", p.sz_bytes), ("nr_accesses", p.nr_accesses), ("age", p.age)):
        # a fresh directory holds 0/0: write max first, and min only when it is not the default
        out.append((f"{sd}/access_pattern/{name}/max", str(hi)))
        if lo:
            out.append((f"{sd}/access_pattern/{name}/min", str(lo)))
    if s.apply_interval_us is not None:
        out.append((f"{sd}/apply_interval_us", str(s.apply_interval_us)))
    if s.target_nid is not None:
        out.append((f"{sd}/target_nid", str(s.target_nid)))
    if s.quotas is not None:
        q = s.quotas
        out += [
            (f"{sd}/quotas/ms", str(q.ms)),
            (f"{sd}/quotas/bytes", str(q.bytes)),
            (f"{sd}/quotas/reset_interval_ms", str(q.reset_interval_ms)),
            (f"{sd}/quotas/weights/sz_permil", str(q.sz_permil)),
            (f"{sd}/quotas/weights/nr_accesses_permil", str(q.nr_accesses_permil)),
            (f"{sd}/quotas/weights/age_permil", str(q.age_permil)),
        ]
    if s.watermarks is not None:
        w = s.watermarks
        out += [
            (f"{sd}/watermarks/metric", w.metric),
            (f"{sd}/watermarks/interval_us", str(w.interval_us)),
            (f"{sd}/watermarks/high", str(w.high)),
            (f"{sd}/watermarks/mid", str(w.mid)),
            (f"{sd}/watermarks/low", str(w.low)),
        ]
    if s.filters:
        fd = f"{sd}/{filters_dir}"
        out.append((f"{fd}/nr_filters", str(len(s.filters))))
        for i, f in enumerate(s.filters):
            d = f"{fd}/{i}"
            out.append((f"{d}/type", f.type))
            if f.target_idx is not None:
                out.append((f"{d}/damon_target_idx", str(f.target_idx)))
            if f.memcg_path is not None:
                out.append((f"{d}/memcg_path", f.memcg_path))
            if f.addr_range is not None:
                out += [(f"{d}/addr_start", str(f.addr_range[0])), (f"{d}/addr_end", str(f.addr_range[1]))]
            out.append((f"{d}/matching", _yn(f.matching)))
    return out


def _hint_for(path: str, value: str) -> str:
    if path.endswith("/operations"):
        return HINT_PADDR if value == Ops.PADDR else HINT_VADDR if value in (Ops.VADDR, Ops.FVADDR) else ""
    if path.endswith("/type") and value == "target":
        return HINT_TARGET_FILTER
    if path.endswith("/action") and value in ("migrate_hot", "migrate_cold"):
        return HINT_MIGRATE
    if path.endswith("/state") and value in (Command.UPDATE_TRIED_REGIONS, Command.CLEAR_TRIED_REGIONS):
        return HINT_TRIED_REGIONS
    return ""


# ---- I/O ------------------------------------------------------------------------------------------------------


class DamonFS:
    """Reads and writes the DAMON admin tree through a ``SysFS`` (swappable root). Every method does exactly the
    I/O its name says; callers decide what to touch."""

    def __init__(self, sysfs: SysFS) -> None:
        self.sysfs = sysfs

    # -- reads --

    def present(self) -> bool:
        """Whether the kernel has the DAMON sysfs interface."""
        return self.sysfs.exists(NR_KDAMONDS)

    def writable(self) -> bool:
        """Whether this process may write the admin tree (root, or CAP_DAC_OVERRIDE: the check uses the effective
        ids and capabilities, as the write itself will)."""
        return os.access(self.sysfs.path(NR_KDAMONDS), os.W_OK, effective_ids=os.access in os.supports_effective_ids)

    def _read(self, rel: str) -> str:
        """One DAMON file. The kernel only try-locks its sysfs mutex for reads (EBUSY while another writer, such as
        a ``damo`` run or another kdamond's refresh, holds it): a busy read is retried for a moment."""
        for attempt in range(BUSY_READ_ATTEMPTS):
            try:
                return self.sysfs.read_text(rel)
            except ReadFailure as e:
                if e.reason != _EBUSY_REASON or attempt + 1 == BUSY_READ_ATTEMPTS:
                    raise DamonReadFailed(rel, e.reason) from None
                time.sleep(BUSY_READ_WAIT_S)
        raise AssertionError("unreachable")

    def _int(self, rel: str) -> int:
        text = self._read(rel)
        try:
            return int(text)
        except ValueError:
            raise DamonReadFailed(rel, f"unparsable: expected an integer, got {text[:40]!r}") from None

    def nr_kdamonds(self) -> int:
        return self._int(NR_KDAMONDS)

    def kdamond_state(self, k: int) -> KdamondState:
        """``state`` and ``pid`` of kdamond ``k`` (two small reads)."""
        d = kdamond_dir(k)
        state_text, pid_text = self._read(f"{d}/state"), self._read(f"{d}/pid")
        try:
            return KdamondState(k, parse_state(state_text), parse_pid(pid_text))
        except ValueError as e:
            raise DamonReadFailed(d, f"unparsable: {e}") from None

    def kdamond_info(self, k: int) -> KdamondInfo:
        """Everything ``probe``/ownership checks show about kdamond ``k`` (a handful of reads)."""
        st = self.kdamond_state(k)
        ops: str | None = None
        avail: frozenset[str] = frozenset()
        nr_targets = nr_schemes = 0
        if self._int(f"{kdamond_dir(k)}/contexts/nr_contexts") > 0:
            c = context_dir(k)
            ops = self._read(f"{c}/operations")
            avail = parse_avail_operations(self._read(f"{c}/avail_operations"))
            nr_targets = self._int(f"{c}/targets/nr_targets")
            nr_schemes = self._int(f"{c}/schemes/nr_schemes")
        return KdamondInfo(k, st.running, st.pid, ops, avail, nr_targets, nr_schemes)

    def scheme_actions(self, k: int) -> list[str]:
        """The action of each scheme of kdamond ``k``'s context (empty without a context)."""
        if self._int(f"{kdamond_dir(k)}/contexts/nr_contexts") == 0:
            return []
        n = self._int(f"{context_dir(k)}/schemes/nr_schemes")
        return [self._read(f"{scheme_dir(k, i)}/action") for i in range(n)]

    def context_ops(self, k: int) -> str | None:
        """The operations of kdamond ``k``'s context, None when it has none."""
        if self._int(f"{kdamond_dir(k)}/contexts/nr_contexts") == 0:
            return None
        return self._read(f"{context_dir(k)}/operations")

    def avail_operations(self, k: int) -> frozenset[str]:
        """The operations this kernel offers, as kdamond ``k``'s context shows them (it must have one)."""
        return parse_avail_operations(self._read(f"{context_dir(k)}/avail_operations"))

    def kdamond_pid(self, k: int) -> int | None:
        """Kdamond ``k``'s thread pid, None while it is off (one read: the cheap per-tick check)."""
        rel = f"{kdamond_dir(k)}/pid"
        text = self._read(rel)
        try:
            return parse_pid(text)
        except ValueError as e:
            raise DamonReadFailed(rel, f"unparsable: {e}") from None

    def tried_regions(self, k: int, s: int) -> list[TriedRegion]:
        """The regions scheme ``s`` of kdamond ``k`` was tried on, as of the last ``update_schemes_tried_regions``,
        sorted by start. Four small reads per region.

        This is the daemon's hot path (every tick, hundreds of regions), so the files are read with bare
        open/read/close relative to the tried_regions directory (under the SysFS root) instead of
        ``SysFS.read_text``: Python's buffered open costs about eight syscalls and a full path walk per file. In
        the TCG guest (6.12) that measured 4.3 ms per file through ``read_text`` against 0.07 ms this way.
        """
        base = f"{scheme_dir(k, s)}/tried_regions"
        out: list[TriedRegion] = []
        try:
            dfd = os.open(self.sysfs.path(base), os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise DamonReadFailed(base, os.strerror(e.errno or errno.EIO)) from None
        try:
            for name in os.listdir(dfd):
                if not name.isdigit():
                    continue  # total_bytes
                texts = []
                for f in ("start", "end", "nr_accesses", "age"):
                    try:
                        fd = os.open(f"{name}/{f}", os.O_RDONLY, dir_fd=dfd)
                        try:
                            texts.append(os.read(fd, 64).decode("ascii", errors="replace"))
                        finally:
                            os.close(fd)
                    except OSError as e:
                        raise DamonReadFailed(f"{base}/{name}/{f}", os.strerror(e.errno or errno.EIO)) from None
                try:
                    out.append(parse_tried_region(*texts))
                except ValueError as e:
                    raise DamonReadFailed(f"{base}/{name}", f"unparsable: {e}") from None
        finally:
            os.close(dfd)
        out.sort(key=lambda r: r.start)
        return out

    def sz_tried(self, k: int, s: int) -> int:
        """Bytes of the regions scheme ``s`` of kdamond ``k`` was tried on, summed over every aggregation since
        the scheme was set up, as of the last ``update_schemes_stats``."""
        return self._int(f"{scheme_dir(k, s)}/stats/sz_tried")

    def filters_dir(self, k: int, s: int) -> str:
        """``core_filters`` when the kernel has it (6.15+: core-layer filters such as ``target`` go there), else
        ``filters``. Scheme ``s`` must exist."""
        return "core_filters" if self.sysfs.is_dir(f"{scheme_dir(k, s)}/core_filters") else "filters"

    def modules_enabled(self) -> list[str]:
        """DAMON modules (damon_reclaim, damon_lru_sort, damon_stat) whose ``enabled`` parameter is Y: each runs a
        kdamond outside the admin tree."""
        out = []
        for m in MODULE_USERS:
            rel = module_enabled_file(m)
            try:
                if self.sysfs.read_text(rel) in ("Y", "1"):
                    out.append(m)
            except ReadFailure:
                continue
        return out

    # -- writes --

    def write(self, rel: str, value: str) -> None:
        """One write; the kernel's refusal becomes ``DamonWriteFailed`` (with a version hint where one applies)."""
        try:
            self.sysfs.write_text(rel, value)
        except OSError as e:
            raise DamonWriteFailed(rel, value, e.errno or errno.EIO, _hint_for(rel, value)) from None

    def write_all(self, writes: Iterable[tuple[str, str]]) -> None:
        for rel, value in writes:
            self.write(rel, value)

    def set_nr_kdamonds(self, n: int) -> None:
        """Recreate every kdamond directory (destroys all their configuration; EBUSY while any kdamond runs)."""
        self.write(NR_KDAMONDS, str(n))

    def command(self, k: int, cmd: Command) -> None:
        """Write ``cmd`` to kdamond ``k``'s state file. Blocks for commit and tried-regions updates."""
        self.write(f"{kdamond_dir(k)}/state", cmd.value)

    def create_context(self, k: int) -> None:
        """Create kdamond ``k``'s context directory (recreating it with kernel defaults)."""
        self.write(f"{kdamond_dir(k)}/contexts/nr_contexts", "1")

    def configure_context(self, k: int, ctx: Context) -> None:
        """Configure kdamond ``k``'s freshly created context: operations, attributes, and the targets and schemes
        when there are any (a fresh context has none)."""
        c = context_dir(k)
        self.write(f"{c}/operations", ctx.ops)
        self.write_all(attrs_writes(c, ctx.attrs))
        if ctx.targets:
            self.write_targets(k, ctx.targets)
        if ctx.schemes:
            self.write_schemes(k, ctx.schemes)

    def write_attrs(self, k: int, attrs: MonitoringAttrs) -> None:
        """Set kdamond ``k``'s intervals and region bounds (effective at the next ``on`` or ``commit``)."""
        self.write_all(attrs_writes(context_dir(k), attrs))

    def write_targets(self, k: int, targets: Sequence[Target]) -> None:
        """Recreate kdamond ``k``'s targets (effective at the next ``on`` or ``commit``)."""
        self.write_all(targets_writes(context_dir(k), targets))

    def write_schemes(self, k: int, schemes: Sequence[Scheme]) -> None:
        """Recreate kdamond ``k``'s schemes (effective at the next ``on`` or ``commit``)."""
        self.write(f"{context_dir(k)}/schemes/nr_schemes", str(len(schemes)))
        fdir = "filters"
        if any(s.filters for s in schemes):
            fdir = self.filters_dir(k, 0)
        for i, s in enumerate(schemes):
            self.write_all(scheme_writes(scheme_dir(k, i), s, fdir))


#: DAMOS actions that move pages between nodes (6.11+), and reclaim that takes them off a node.
MIGRATING_ACTIONS = frozenset({"migrate_hot", "migrate_cold", "pageout"})


def migrating_schemes(door: DamonFS, skip: Iterable[int] = ()) -> list[str]:
    """Running kdamonds (other than ``skip``) with a scheme that migrates or reclaims pages, described for an
    operator: "kdamond 0 scheme 1: migrate_cold". Read failures (a kdamond going away meanwhile) are skipped."""
    out: list[str] = []
    if not door.present():
        return out
    skipped = set(skip)
    try:
        n = door.nr_kdamonds()
    except DamonError:
        return out
    for k in range(n):
        if k in skipped:
            continue
        try:
            if not door.kdamond_state(k).running:
                continue
            actions = door.scheme_actions(k)
        except DamonError:
            continue
        out += [f"kdamond {k} scheme {i}: {a}" for i, a in enumerate(actions) if a in MIGRATING_ACTIONS]
    return out
