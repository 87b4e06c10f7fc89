"""Kernel device events for the topology that tierd cares about: memory blocks, nodes, CXL, DAX, memory tiers.

``UdevListener`` wraps a pyudev netlink ``Monitor`` filtered to the subsystems in ``SUBSYSTEMS``. It exposes
``fileno()`` for a selector loop, ``drain_events()`` (never blocks) and ``poll(timeout_s)``; both return frozen
``UdevEvent`` values. pyudev is used for events only: the few attributes copied into an event are read when the
event arrives (they may be gone by the time anyone looks); everything else in tierd reads sysfs through
``tierd.kernel.fs.SysFS`` so it can be pointed at fixture trees.

``FakeUdev`` is the same interface on a real pipe: tests ``emit()`` events and the consumer's selector wakes up
exactly as it would on the netlink socket.
"""

from __future__ import annotations

import logging
import os
import select
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

log = logging.getLogger(__name__)

SUBSYSTEMS: tuple[str, ...] = ("memory", "node", "cxl", "dax", "memory_tiering")

# Attributes copied into events, per subsystem (read only for actions where the device still exists).
ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "memory": ("state", "online_type", "phys_index"),
    "node": ("cpulist",),
    "cxl": ("mode", "size", "commit", "numa_node"),
    "dax": ("target_node", "size"),
    "memory_tiering": ("nodelist",),
}

_NO_ATTRIBUTES_FOR = frozenset({"remove", "unbind"})


@dataclass(frozen=True, slots=True)
class UdevEvent:
    """One device event. ``attributes`` holds the subsystem's attributes of interest that could be read."""

    action: str  # add, remove, change, online, offline, bind, unbind, move
    subsystem: str
    sys_name: str  # e.g. memory40, node2, region0, dax0.0, memory_tier22
    devpath: str  # e.g. /devices/system/memory/memory40
    devtype: str | None = None  # e.g. cxl_region, cxl_memdev for the cxl bus
    driver: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    def attr(self, name: str) -> str | None:
        return self.attributes.get(name)


class EventSource(Protocol):
    """What the daemon needs from an event source (``UdevListener`` or ``FakeUdev``)."""

    def fileno(self) -> int: ...

    def drain_events(self) -> list[UdevEvent]: ...

    def poll(self, timeout_s: float) -> list[UdevEvent]: ...

    def close(self) -> None: ...


def _wait_readable(fd: int, timeout_s: float) -> bool:
    readable, _, _ = select.select([fd], [], [], max(0.0, timeout_s))
    return bool(readable)


def event_from_device(device: Any, wanted: Mapping[str, tuple[str, ...]] = ATTRIBUTES) -> UdevEvent:
    """Convert a ``pyudev.Device`` delivered by a monitor into a ``UdevEvent`` (reads attributes now)."""
    action = str(device.action or "")
    subsystem = str(device.subsystem or "")
    attrs: dict[str, str] = {}
    if action not in _NO_ATTRIBUTES_FOR:
        for name in wanted.get(subsystem, ()):
            try:
                value = device.attributes.asstring(name)
            except (KeyError, UnicodeDecodeError, OSError):
                continue
            attrs[name] = value.strip()
    return UdevEvent(
        action=action,
        subsystem=subsystem,
        sys_name=str(device.sys_name),
        devpath=str(device.device_path),
        devtype=device.device_type,
        driver=device.driver,
        attributes=attrs,
    )


class UdevListener:
    """Netlink listener for ``subsystems``.

    ``source`` is "udev" (events after udevd processed them; needs systemd-udevd) or "kernel" (raw uevents, no
    daemon needed). Default: "udev" when udevd's control socket exists, else "kernel". Events are filtered by
    subsystem in the socket (udev source) and again here (libudev's filter does not apply to kernel uevents).
    """

    def __init__(self, subsystems: Iterable[str] = SUBSYSTEMS, source: str | None = None) -> None:
        import pyudev  # type: ignore[import-untyped]  # lazily: fixture-driven code never needs it

        self.subsystems = tuple(subsystems)
        if source is None:
            source = "udev" if os.path.exists("/run/udev/control") else "kernel"
        self.source = source
        self._context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(self._context, source=source)
        for s in self.subsystems:
            monitor.filter_by(s)
        monitor.start()
        self._monitor: Any = monitor
        log.debug("udev listener on %s events for %s", source, ",".join(self.subsystems))

    def fileno(self) -> int:
        return int(self._monitor.fileno())

    def drain_events(self) -> list[UdevEvent]:
        """Every event already queued on the socket; never blocks."""
        out: list[UdevEvent] = []
        while True:
            device = self._monitor.poll(timeout=0)
            if device is None:
                return out
            if device.subsystem not in self.subsystems:
                continue
            try:
                out.append(event_from_device(device))
            except Exception:  # a malformed event must not kill the loop
                log.exception("dropping unparsable udev event for %s", getattr(device, "device_path", "?"))

    def poll(self, timeout_s: float) -> list[UdevEvent]:
        """Wait up to ``timeout_s`` for the first event, then return everything queued."""
        if not _wait_readable(self.fileno(), timeout_s):
            return []
        return self.drain_events()

    def close(self) -> None:
        """Stop listening. pyudev has no close(): the socket is closed when the last reference to the monitor goes."""
        self._monitor = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeUdev:
    """A pipe-backed stand-in for ``UdevListener``: ``emit()`` queues events and makes ``fileno()`` readable."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._queue: deque[UdevEvent] = deque()
        self.closed = False

    def emit(self, *events: UdevEvent) -> None:
        for ev in events:
            self._queue.append(ev)
            os.write(self._w, b"e")

    def fileno(self) -> int:
        return self._r

    def drain_events(self) -> list[UdevEvent]:
        while True:
            try:
                if not os.read(self._r, 4096):
                    break
            except BlockingIOError:
                break
        out = list(self._queue)
        self._queue.clear()
        return out

    def poll(self, timeout_s: float) -> list[UdevEvent]:
        if not self._queue and not _wait_readable(self._r, timeout_s):
            return []
        return self.drain_events()

    def close(self) -> None:
        if not self.closed:
            os.close(self._r)
            os.close(self._w)
            self.closed = True
