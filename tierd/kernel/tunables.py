"""The kernel's tiering settings tierd may change while it owns placement, and their restoration.

``kernel.numa_balancing`` (procfs sys/kernel/numa_balancing), ``demotion_enabled`` (sysfs
kernel/mm/numa/demotion_enabled) and, when the config allows it, DAMON_STAT's ``enabled`` (sysfs
module/damon_stat/parameters/enabled: its kdamond keeps tierd's from starting). What tierd found is recorded in
``STATE_DIR/kernel.json`` before the first change, so a tierd that was killed (-9, OOM) and restarted restores the
values from before it ever ran, not the ones it set itself.

Only uid 0 may write a sysctl (the kernel ignores capabilities there), so a tierd running as its own user cannot
change ``kernel.numa_balancing`` itself: ``tierd take-over-kernel`` makes the changes as root before the daemon
starts and ``tierd restore-kernel`` puts them back after it stops (the unit's ``ExecStartPre=+`` and
``ExecStopPost=+``). The daemon restores what it can and leaves the rest in the record for that root step.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tierd.kernel.damon import module_enabled_file
from tierd.kernel.fs import ProcFS, ReadFailure, SysFS
from tierd.policy.kernel import DAMON_STAT, DEMOTION_ENABLED, NUMA_BALANCING, SettingChange

log = logging.getLogger(__name__)

RECORD = "kernel.json"
ROOT_STEPS = ("only uid 0 may write sysctls: run `tierd take-over-kernel` as root before tierd starts and "
              "`tierd restore-kernel` after it stops (the unit's ExecStartPre=+ and ExecStopPost=+ do)")


def _refused_to_non_root(e: OSError) -> bool:
    return e.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0


class Tunables:
    """Reads and writes the two settings through the swappable roots."""

    def __init__(self, sysfs: SysFS, procfs: ProcFS, state_dir: Path) -> None:
        self.sysfs = sysfs
        self.procfs = procfs
        self.record = state_dir / RECORD

    def _where(self, name: str) -> tuple[SysFS | ProcFS, str]:
        if name == NUMA_BALANCING:
            return self.procfs, "sys/kernel/numa_balancing"
        if name == DEMOTION_ENABLED:
            return self.sysfs, "kernel/mm/numa/demotion_enabled"
        if name == DAMON_STAT:
            return self.sysfs, module_enabled_file("damon_stat")
        raise KeyError(name)

    def read(self, name: str) -> str | None:
        tree, rel = self._where(name)
        try:
            return tree.read_text(rel)
        except ReadFailure:
            return None

    def write(self, name: str, value: str) -> None:
        """Raises OSError as the kernel reports it."""
        tree, rel = self._where(name)
        tree.write_text(rel, value)

    def recorded_originals(self) -> dict[str, str]:
        """Values found before tierd first changed them, from an earlier run that did not restore them."""
        try:
            data = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def apply(self, changes: Sequence[SettingChange]) -> tuple[list[SettingChange], list[str]]:
        """Make the changes, recording the originals first. Returns the changes made and errors as messages."""
        originals = self.recorded_originals()
        for c in changes:
            originals.setdefault(c.name, c.current)
        self._save(originals)
        done, errors = [], []
        for c in changes:
            try:
                self.write(c.name, c.wanted)
            except OSError as e:
                why = e.strerror or str(e)
                if _refused_to_non_root(e):
                    why += f" ({ROOT_STEPS})"
                errors.append(f"cannot set {c.name} to {c.wanted}: {why}")
                continue
            log.warning("changed kernel setting %s", c.describe())
            done.append(c)
        return done, errors

    def restore(self) -> list[str]:
        """Put back every recorded original value; forget the record once all are restored, else keep what is left
        in it. A setting the kernel refuses to a non-root tierd stays recorded for ``tierd restore-kernel`` (logged,
        not an error). Returns errors."""
        originals = self.recorded_originals()
        errors, left = [], {}
        for name, value in originals.items():
            try:
                if self.read(name) != value:
                    self.write(name, value)
                    log.warning("restored kernel setting %s to %s", name, value)
            except OSError as e:
                left[name] = value
                if _refused_to_non_root(e):
                    log.info("left %s=%s for root to restore (%s)", name, value, ROOT_STEPS)
                else:
                    errors.append(f"cannot restore {name} to {value}: {e.strerror or e}")
            except KeyError:
                errors.append(f"cannot restore {name} to {value}: not a setting tierd knows (kept in {self.record})")
                left[name] = value
        if left:
            self._save(left)
        else:
            try:
                self.record.unlink()
            except FileNotFoundError:
                pass
        return errors

    def _save(self, originals: dict[str, str]) -> None:
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(originals))
        os.replace(tmp, self.record)
