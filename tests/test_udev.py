"""Unit tests for tierd.kernel.udev: the pipe-backed fake, event conversion, and the real listener's plumbing."""

from __future__ import annotations

import selectors
from dataclasses import dataclass, field
from typing import Any

import pytest

from tierd.kernel.udev import FakeUdev, UdevEvent, UdevListener, event_from_device


def _ev(action: str, subsystem: str, name: str, **attrs: str) -> UdevEvent:
    return UdevEvent(action=action, subsystem=subsystem, sys_name=name, devpath=f"/devices/x/{name}",
                     attributes=attrs)


def test_fake_wakes_a_selector_and_drains_in_order() -> None:
    fake = FakeUdev()
    sel = selectors.DefaultSelector()
    sel.register(fake.fileno(), selectors.EVENT_READ)
    assert sel.select(timeout=0) == []
    fake.emit(_ev("add", "node", "node2"), _ev("online", "memory", "memory40", state="online"))
    assert len(sel.select(timeout=0)) == 1
    events = fake.drain_events()
    assert [(e.action, e.sys_name) for e in events] == [("add", "node2"), ("online", "memory40")]
    assert events[1].attr("state") == "online"
    assert sel.select(timeout=0) == []
    assert fake.drain_events() == []
    sel.close()
    fake.close()


def test_fake_poll_times_out_empty_and_returns_queued() -> None:
    fake = FakeUdev()
    assert fake.poll(0.01) == []
    fake.emit(_ev("add", "dax", "dax0.0", target_node="2"))
    assert [e.sys_name for e in fake.poll(1.0)] == ["dax0.0"]
    fake.close()
    assert fake.closed


def test_events_are_frozen() -> None:
    ev = _ev("add", "node", "node2")
    with pytest.raises(AttributeError):
        ev.action = "remove"  # type: ignore[misc]


@dataclass
class _Attrs:
    values: dict[str, str]

    def asstring(self, name: str) -> str:
        return self.values[name]


@dataclass
class _Device:
    action: str
    subsystem: str
    sys_name: str
    device_path: str
    device_type: str | None = None
    driver: str | None = None
    attributes: Any = field(default_factory=lambda: _Attrs({}))


def test_event_from_device_reads_only_wanted_attributes() -> None:
    dev = _Device("online", "memory", "memory40", "/devices/system/memory/memory40",
                  attributes=_Attrs({"state": "online\n", "phys_index": "00000028", "uevent": "junk"}))
    ev = event_from_device(dev)
    assert ev == UdevEvent("online", "memory", "memory40", "/devices/system/memory/memory40",
                           attributes={"state": "online", "phys_index": "00000028"})


def test_event_from_device_skips_attributes_on_remove() -> None:
    dev = _Device("remove", "dax", "dax0.0", "/devices/platform/x/dax0.0", driver=None,
                  attributes=_Attrs({"target_node": "2"}))
    assert event_from_device(dev).attributes == {}


def test_event_from_device_keeps_devtype_and_driver() -> None:
    dev = _Device("bind", "cxl", "region0", "/devices/platform/ACPI0017:00/root0/decoder0.0/region0",
                  device_type="cxl_region", driver="cxl_region", attributes=_Attrs({"commit": "1", "size": "0x1"}))
    ev = event_from_device(dev)
    assert (ev.devtype, ev.driver, ev.attr("commit"), ev.attr("mode")) == ("cxl_region", "cxl_region", "1", None)


def test_real_listener_opens_a_pollable_socket() -> None:
    try:
        listener = UdevListener(source="kernel")
    except OSError as e:  # netlink may be forbidden in a sandbox; the fake covers the logic
        pytest.skip(f"netlink unavailable here: {e}")
    assert listener.fileno() >= 0
    assert listener.poll(0.0) == [] or all(e.subsystem in listener.subsystems for e in listener.poll(0.0))
    listener.close()
