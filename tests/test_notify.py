"""tierd.kernel.notify against real AF_UNIX datagram sockets, read back the way systemd reads its notify socket."""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierd.kernel.notify import Notifier, format_message, parse_notify_socket, settings_from_environ


class Receiver:
    """A bound datagram socket standing in for systemd's notify socket (SO_PASSCRED on, like PID 1's)."""

    def __init__(self, address: str) -> None:
        self.address = address  # NOTIFY_SOCKET spelling: a path, or '@name' for the abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(2.0)

    def recv(self) -> tuple[bytes, int]:
        """One datagram and the sender's pid from its SCM_CREDENTIALS (what NotifyAccess=main checks)."""
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _, _ = struct.unpack("3i", payload[: struct.calcsize("3i")])
        return data, pid

    def fields(self) -> dict[str, str]:
        """The next message parsed as systemd does: split on newlines, each line KEY=VALUE."""
        data, _ = self.recv()
        return parse(data)

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(2.0)

    def close(self) -> None:
        self.sock.close()


def parse(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in data.decode().split("\n"):
        key, sep, value = line.partition("=")
        assert sep == "=" and key, f"line {line!r} is not KEY=VALUE"
        out[key] = value
    return out


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(str(tmp_path / "notify"))
    yield r
    r.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    r = Receiver(f"@tierd-test-{uuid.uuid4().hex}")
    yield r
    r.close()


def notifier_for(r: Receiver, **env: str) -> Notifier:
    return Notifier(environ={"NOTIFY_SOCKET": r.address, **env}, pid=os.getpid())


# ---- messages ---------------------------------------------------------------------------------------------------


def test_ready_with_status_arrives_as_systemd_parses_it(receiver: Receiver) -> None:
    n = notifier_for(receiver)
    assert n.enabled
    assert n.ready("tiering 3 nodes")
    data, pid = receiver.recv()
    assert data == b"READY=1\nSTATUS=tiering 3 nodes"
    assert pid == os.getpid()  # sent by this process itself, as NotifyAccess=main requires
    assert n.ready()
    assert receiver.recv()[0] == b"READY=1"
    assert (n.sent, n.errors) == (2, 0)


def test_reloading_carries_clock_monotonic_in_microseconds(receiver: Receiver) -> None:
    n = notifier_for(receiver)
    before_us = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
    assert n.reloading()
    after_us = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000) + 1
    data, _ = receiver.recv()
    fields = parse(data)
    assert list(fields) == ["RELOADING", "MONOTONIC_USEC"]
    assert fields["RELOADING"] == "1"
    assert fields["MONOTONIC_USEC"].isdigit()
    assert before_us <= int(fields["MONOTONIC_USEC"]) <= after_us


def test_reloading_uses_the_injected_clock(receiver: Receiver) -> None:
    n = Notifier(environ={"NOTIFY_SOCKET": receiver.address}, pid=1, clock_ns=lambda: 123_456_789_999)
    assert n.reloading()
    assert receiver.recv()[0] == b"RELOADING=1\nMONOTONIC_USEC=123456789"


def test_status_watchdog_stopping(receiver: Receiver) -> None:
    n = notifier_for(receiver)
    assert n.status("demoting 12 MiB\nfrom node 0")
    assert receiver.recv()[0] == b"STATUS=demoting 12 MiB from node 0"  # a newline would split the assignment
    assert n.watchdog()
    assert receiver.recv()[0] == b"WATCHDOG=1"
    assert n.stopping()
    assert receiver.recv()[0] == b"STOPPING=1"
    assert not receiver.pending()
    assert n.sent == 3


def test_send_arbitrary_fields_in_order(receiver: Receiver) -> None:
    n = notifier_for(receiver)
    assert n.send(STATUS="draining node 2", ERRNO=0, EXTEND_TIMEOUT_USEC=5_000_000)
    assert receiver.recv()[0] == b"STATUS=draining node 2\nERRNO=0\nEXTEND_TIMEOUT_USEC=5000000"


def test_malformed_fields_are_refused_before_sending(receiver: Receiver) -> None:
    n = notifier_for(receiver)
    with pytest.raises(ValueError, match="newline"):
        n.send(STATUS="two\nlines")
    with pytest.raises(ValueError, match="field name"):
        n.send(ready="1")
    with pytest.raises(ValueError, match="at least one"):
        format_message({})
    assert not receiver.pending()
    assert (n.sent, n.errors) == (0, 0)


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    n = notifier_for(abstract_receiver)
    assert n.ready("up")
    assert abstract_receiver.fields() == {"READY": "1", "STATUS": "up"}
    assert n.reloading()
    assert set(abstract_receiver.fields()) == {"RELOADING", "MONOTONIC_USEC"}
    assert n.watchdog() and n.stopping()
    assert abstract_receiver.fields() == {"WATCHDOG": "1"}
    assert abstract_receiver.fields() == {"STOPPING": "1"}


def test_socket_addresses() -> None:
    assert parse_notify_socket("/run/systemd/notify") == b"/run/systemd/notify"
    assert parse_notify_socket("@/org/freedesktop/systemd1/notify/42") == b"\0/org/freedesktop/systemd1/notify/42"
    for bad in ("run/notify", "@", "vsock:2:1234"):
        with pytest.raises(ValueError):
            parse_notify_socket(bad)


# ---- watchdog ---------------------------------------------------------------------------------------------------


def test_watchdog_interval_from_watchdog_usec(receiver: Receiver) -> None:
    n = notifier_for(receiver, WATCHDOG_USEC="30000000")
    assert n.watchdog_interval_s == 30.0
    assert n.watchdog_ping_s == 15.0


def test_watchdog_pid_equal_to_ours_enables_it(receiver: Receiver) -> None:
    n = Notifier(environ={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "4242"},
                 pid=4242)
    assert n.watchdog_interval_s == 2.5


def test_watchdog_pid_mismatch_disables_it(receiver: Receiver) -> None:
    n = Notifier(environ={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"},
                 pid=4243)
    assert n.watchdog_interval_s is None
    assert n.watchdog_ping_s is None
    assert n.enabled  # the rest of the protocol still works
    assert n.ready()
    assert receiver.fields() == {"READY": "1"}


@pytest.mark.parametrize("usec", ["0", "-5", "soon", ""])
def test_unusable_watchdog_usec_disables_it(receiver: Receiver, usec: str) -> None:
    assert notifier_for(receiver, WATCHDOG_USEC=usec).watchdog_interval_s is None


def test_watchdog_needs_a_notify_socket() -> None:
    s = settings_from_environ({"WATCHDOG_USEC": "30000000"}, pid=1)
    assert (s.address, s.watchdog_usec) == (None, None)
    assert Notifier(environ={"WATCHDOG_USEC": "30000000"}, pid=1).watchdog_interval_s is None


def test_defaults_read_os_environ_and_our_pid(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier()
    assert n.watchdog_interval_s == 4.0
    assert n.watchdog()
    assert receiver.fields() == {"WATCHDOG": "1"}


# ---- not under systemd, and failures ----------------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tierd.kernel.notify")
    for env in ({}, {"NOTIFY_SOCKET": ""}):
        n = Notifier(environ=env, pid=os.getpid())
        assert not n.enabled
        assert n.address == ""
        results = [n.ready("x"), n.reloading(), n.status("x"), n.watchdog(), n.stopping(), n.send(READY=1)]
        assert results == [False] * 6
        assert (n.sent, n.errors) == (0, 0)
        assert n.watchdog_interval_s is None
    assert caplog.records == []


def test_unusable_notify_socket_is_reported_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tierd.kernel.notify")
    n = Notifier(environ={"NOTIFY_SOCKET": "relative/notify", "WATCHDOG_USEC": "1000000"}, pid=1)
    assert not n.enabled
    assert n.errors == 1
    assert not n.ready()
    assert n.watchdog_interval_s is None
    assert any("relative/notify" in r.getMessage() for r in caplog.records)


def test_vanished_socket_is_counted_logged_once_and_recovers(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tierd.kernel.notify")
    path = tmp_path / "notify"
    first = Receiver(str(path))
    n = notifier_for(first)
    assert n.ready()
    assert first.fields() == {"READY": "1"}

    first.close()
    path.unlink()  # systemd went away: ENOENT
    assert n.watchdog() is False
    assert n.status("still here") is False
    assert (n.sent, n.errors) == (1, 2)

    stale = Receiver(str(path))
    stale.close()  # the file is back but nobody reads it: ECONNREFUSED
    assert n.stopping() is False
    assert n.errors == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot send" in warnings[0].getMessage()

    path.unlink()
    back = Receiver(str(path))
    assert n.watchdog()
    assert back.fields() == {"WATCHDOG": "1"}
    assert (n.sent, n.errors) == (2, 3)
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    back.close()
    path.unlink()
    assert n.watchdog() is False  # a second outage is logged again
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    n.close()


def test_close_is_idempotent_and_a_later_send_reopens(receiver: Receiver) -> None:
    with notifier_for(receiver) as n:
        assert n.ready()
    n.close()
    assert n.watchdog()
    assert [receiver.fields(), receiver.fields()] == [{"READY": "1"}, {"WATCHDOG": "1"}]
    n.close()
