"""The sd_notify(3) protocol without libsystemd: tell the service manager READY, RELOADING, STATUS, WATCHDOG, STOPPING.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: a filesystem path (``/run/systemd/notify``) or an
abstract socket name written with a leading ``@``. A message is one datagram of newline-separated ``KEY=VALUE``
assignments sent to that address. With ``WatchdogSec=`` systemd also sets ``WATCHDOG_USEC`` (the timeout) and
``WATCHDOG_PID`` (the process it expects pings from); the service must send ``WATCHDOG=1`` more often than that,
at least every half of it, as sd_watchdog_enabled(3) recommends.

``Notifier`` is built from an environment mapping (``os.environ`` by default) and a pid (``os.getpid()`` by default),
both injectable for tests. Without ``NOTIFY_SOCKET`` (not running under systemd) every method is a no-op returning
False. A failed send is counted (``errors``) and logged once per outage, never raised: a daemon must not die because
the notify socket went away.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

#: Field names systemd parses: upper-case letters, digits and underscores (READY, STATUS, MONOTONIC_USEC, ...).
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")

#: How long a send may block before it counts as failed (systemd drains its socket at once; a full queue is a fault).
DEFAULT_SEND_TIMEOUT_S = 1.0


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds: the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass(frozen=True, slots=True)
class NotifySettings:
    """What the environment says: where to send, and the watchdog timeout if systemd expects pings from us.

    ``address`` is what ``socket.sendto`` takes (bytes; an abstract name starts with a NUL byte) or None when not
    running under systemd or when ``NOTIFY_SOCKET`` cannot be used; ``problems`` says why a variable was ignored.
    """

    address: bytes | None
    display: str  # NOTIFY_SOCKET as given, for log lines
    watchdog_usec: int | None
    problems: tuple[str, ...] = ()


def parse_notify_socket(value: str) -> bytes:
    """The socket address for a ``NOTIFY_SOCKET`` value: an absolute path, or ``@name`` for an abstract socket.

    Raises ValueError for anything else (a relative path, or ``vsock:`` addresses, which tierd does not speak).
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    raise ValueError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an abstract socket ('@name')")


def parse_watchdog(environ: Mapping[str, str], pid: int) -> tuple[int | None, str | None]:
    """(WATCHDOG_USEC, problem): the watchdog timeout in microseconds if it applies to ``pid``, else None.

    Like sd_watchdog_enabled(3): no watchdog without a positive ``WATCHDOG_USEC``, nor when ``WATCHDOG_PID`` is set
    and names another process (the variables were inherited from a parent that systemd watches).
    """
    raw_usec = environ.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None, None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None, f"WATCHDOG_USEC={raw_usec!r} is not an integer: watchdog disabled"
    if usec <= 0:
        return None, f"WATCHDOG_USEC={raw_usec!r} is not positive: watchdog disabled"
    raw_pid = environ.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            watched = int(raw_pid)
        except ValueError:
            return None, f"WATCHDOG_PID={raw_pid!r} is not a pid: watchdog disabled"
        if watched != pid:
            return None, None  # meant for another process (our parent): not an error, just not ours
    return usec, None


def settings_from_environ(environ: Mapping[str, str], pid: int) -> NotifySettings:
    """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (pure: no socket is opened)."""
    problems: list[str] = []
    raw = environ.get("NOTIFY_SOCKET", "")
    address: bytes | None = None
    if raw:
        try:
            address = parse_notify_socket(raw)
        except ValueError as e:
            problems.append(str(e))
    usec, problem = parse_watchdog(environ, pid)
    if problem:
        problems.append(problem)
    return NotifySettings(address=address, display=raw, watchdog_usec=usec if address is not None else None,
                          problems=tuple(problems))


def format_message(fields: Mapping[str, str | int]) -> bytes:
    """One datagram as systemd parses it: ``KEY=VALUE`` lines joined by newlines, in the given order.

    Raises ValueError for a field name systemd would not parse or a value with a newline (it would split into a
    second, bogus assignment). Callers with free text use ``Notifier.status``, which flattens newlines.
    """
    if not fields:
        raise ValueError("an sd_notify message needs at least one field")
    lines: list[str] = []
    for key, value in fields.items():
        if not _FIELD_NAME.fullmatch(key):
            raise ValueError(f"sd_notify field name {key!r} is not upper-case letters, digits and '_'")
        text = str(value)
        if "\n" in text:
            raise ValueError(f"sd_notify field {key} has a newline in its value")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def _one_line(text: str) -> str:
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


class Notifier:
    """Talks sd_notify to the service manager named by the environment; a no-op outside systemd.

    Every method returns True when the message was handed to the socket, False when there is no socket (not under
    systemd) or the send failed. Failures are counted in ``errors`` and logged once until a send works again.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        pid: int | None = None,
        clock_ns: Callable[[], int] = monotonic_ns,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
    ) -> None:
        env = os.environ if environ is None else environ
        self.pid = os.getpid() if pid is None else pid
        self.settings = settings_from_environ(env, self.pid)
        self._clock_ns = clock_ns
        self._send_timeout_s = send_timeout_s
        self._sock: socket.socket | None = None
        self._sent = 0
        self._errors = 0
        self._failing = False
        for problem in self.settings.problems:
            log.warning("sd_notify: %s", problem)
        if self.settings.display and self.settings.address is None:
            self._errors += 1  # systemd expects to hear from us but we cannot reach it: count it like a failed send

    # ---- state -------------------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to notify (``NOTIFY_SOCKET`` set and usable)."""
        return self.settings.address is not None

    @property
    def address(self) -> str:
        """``NOTIFY_SOCKET`` as given ("" when unset)."""
        return self.settings.display

    @property
    def watchdog_interval_s(self) -> float | None:
        """The watchdog timeout systemd enforces (``WATCHDOG_USEC``) in seconds, or None when no watchdog applies to
        this process. Ping at least every half of it (``watchdog_ping_s``)."""
        usec = self.settings.watchdog_usec
        return None if usec is None else usec / 1_000_000

    @property
    def watchdog_ping_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the timeout, as sd_watchdog_enabled(3) recommends."""
        interval = self.watchdog_interval_s
        return None if interval is None else interval / 2

    @property
    def sent(self) -> int:
        """Messages handed to the notify socket."""
        return self._sent

    @property
    def errors(self) -> int:
        """Messages that could not be sent (plus one for a ``NOTIFY_SOCKET`` that cannot be used)."""
        return self._errors

    # ---- messages ----------------------------------------------------------------------------------------------

    def ready(self, status: str = "") -> bool:
        """Startup (or a reload) finished: ``READY=1``, with ``STATUS=`` when ``status`` is given."""
        fields: dict[str, str | int] = {"READY": 1}
        if status:
            fields["STATUS"] = _one_line(status)
        return self.send(**fields)

    def reloading(self) -> bool:
        """A reload began: ``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in microseconds), which
        systemd >= 253 requires for ``Type=notify-reload`` to match the message to the reload it asked for. Send
        ``ready()`` when the reload is done."""
        return self.send(RELOADING=1, MONOTONIC_USEC=self._clock_ns() // 1000)

    def status(self, text: str) -> bool:
        """``STATUS=text`` (shown by ``systemctl status``); newlines become spaces."""
        return self.send(STATUS=_one_line(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the main loop is alive."""
        return self.send(WATCHDOG=1)

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown began."""
        return self.send(STOPPING=1)

    def send(self, **fields: str | int) -> bool:
        """Send one message of ``KEY=VALUE`` fields, e.g. ``send(READY=1, STATUS="up")``.

        Returns False without sending when not under systemd. A malformed field (see ``format_message``) is a
        programming error and raises ValueError; OS errors are counted and logged, never raised.
        """
        address = self.settings.address
        if address is None:
            return False
        data = format_message(fields)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(self._send_timeout_s)
            self._sock.sendto(data, address)
        except OSError as e:
            self._errors += 1
            if not self._failing:
                self._failing = True
                log.warning("sd_notify: cannot send %s to %s: %s (counting further failures silently)",
                            ",".join(fields), self.settings.display, e)
            return False
        self._sent += 1
        if self._failing:
            self._failing = False
            log.info("sd_notify: %s reachable again (%d failed sends so far)", self.settings.display, self._errors)
        return True

    # ---- lifetime ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket (idempotent; a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Notifier(address={self.settings.display!r}, watchdog_usec={self.settings.watchdog_usec}, "
                f"sent={self._sent}, errors={self._errors})")
