"""What this process may do: its effective capabilities (/proc/self/status), against what tierd needs.

tierd needs four capabilities, and uid 0 for one thing no capability grants:

- CAP_SYS_NICE       move_pages/mbind with MPOL_MF_MOVE_ALL (pages shared with other processes) and
                     migrate_pages of other processes
- CAP_SYS_PTRACE     ptrace-read access to other users' processes: their numa_maps, smaps and pagemap, and
                     move_pages/migrate_pages on them (the kernel checks ptrace access for each)
- CAP_SYS_ADMIN      physical frame numbers in /proc/PID/pagemap (the idle-page sampler); writing
                     kernel.numa_balancing (its handler checks CAP_SYS_ADMIN, on top of the uid check below)
- CAP_DAC_OVERRIDE   files owned by others: /proc/PID/pagemap (0400) and clear_refs (0200, soft-dirty), DAMON's
                     sysfs (0600 root), memory block state and demotion_enabled (0644 root)
- uid 0              kernel.numa_balancing: the kernel lets only uid 0 write sysctls, whatever the capabilities;
                     a non-root tierd leaves that to a root step before and after it (tierd/kernel/tunables.py)

``check`` lists what is missing, each with what it costs, for the daemon's log and ``tierctl status``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierd.kernel.fs import ProcFS, ReadFailure

CAP_DAC_OVERRIDE = 1
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_NICE = 23

NEEDED: dict[int, tuple[str, str]] = {
    CAP_SYS_NICE: ("CAP_SYS_NICE", "pages shared with other processes stay where they are (MPOL_MF_MOVE_ALL)"),
    CAP_SYS_PTRACE: ("CAP_SYS_PTRACE", "other users' processes can be neither read nor moved"),
    CAP_SYS_ADMIN: ("CAP_SYS_ADMIN", "pagemap hides frame numbers (no idle-page sampling), and the kernel refuses "
                                     "kernel.numa_balancing changes"),
    CAP_DAC_OVERRIDE: ("CAP_DAC_OVERRIDE", "no DAMON, no soft-dirty on other users' processes, no memory block "
                                           "offlining, no demotion_enabled changes"),
}
"""Capability number -> (name, what tierd cannot do without it)."""

#: What ``tierctl drain`` needs of NEEDED: moving pages of other users' processes and shared pages, reading their
#: /proc files, writing memory block state (root-owned files). CAP_SYS_ADMIN only adds frame numbers it does not use.
DRAIN_CAPS = (CAP_SYS_NICE, CAP_SYS_PTRACE, CAP_DAC_OVERRIDE)
#: What an unprivileged scan of processes lacks to see all of them (their numa_maps and pagemap).
SCAN_CAPS = (CAP_SYS_PTRACE, CAP_DAC_OVERRIDE)

@dataclass(frozen=True, slots=True)
class Privilege:
    effective: int  # the CapEff bit mask

    def has(self, cap: int) -> bool:
        return bool(self.effective >> cap & 1)

    def lacking(self, caps: tuple[int, ...]) -> list[str]:
        """The names of ``caps`` this process does not have."""
        return [NEEDED[c][0] for c in caps if not self.has(c)]

    def missing(self) -> list[str]:
        """What tierd cannot do with these capabilities, one operator line each. (Not being uid 0 matters only
        when a sysctl must change: the kernel hand-over says so then.)"""
        return [f"missing {name}: {cost}" for cap, (name, cost) in sorted(NEEDED.items()) if not self.has(cap)]


def read_privilege(procfs: ProcFS | None = None) -> Privilege:
    """This process's effective capabilities (all bits clear when /proc/self/status cannot be read)."""
    procfs = procfs or ProcFS()
    try:
        text = procfs.read_text("self/status")
    except ReadFailure:
        return Privilege(0)
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return Privilege(int(line.split()[1], 16))
    return Privilege(0)
