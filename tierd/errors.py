"""Typed errors raised at tierd's boundaries.

Each error carries enough context for an operator to act on it: the file, the key, the value and why.
"""

from __future__ import annotations

# sysexits(3) codes used by the command-line tools.
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_NOPERM = 77
EX_CONFIG = 78


class TierdError(Exception):
    """Base class for every error tierd raises on purpose."""

    exit_code = EX_SOFTWARE


class ConfigError(TierdError):
    """The config file is unreadable or invalid: names the file, key path, line and reason."""

    exit_code = EX_CONFIG

    def __init__(self, file: str, reason: str, key: str | None = None, line: int | None = None) -> None:
        self.file = file
        self.key = key
        self.line = line
        self.reason = reason
        where = file
        if line is not None:
            where += f":{line}"
        if key:
            where += f": key '{key}'"
        super().__init__(f"{where}: {reason}")


class UsageError(TierdError):
    """A command-line argument is wrong (unknown node, bad value)."""

    exit_code = EX_USAGE


class CommandNotFound(UsageError):
    """``tierctl run``'s command does not exist: exit 127, as env(1), sudo and shells do."""

    exit_code = 127


class CommandNotRunnable(UsageError):
    """``tierctl run``'s command exists but cannot be executed: exit 126, as env(1), sudo and shells do."""

    exit_code = 126


class NeedsPrivilege(TierdError):
    """The operation needs a privilege (root, CAP_SYS_NICE, CAP_SYS_ADMIN) the caller lacks."""

    exit_code = EX_NOPERM


class KernelError(TierdError):
    """The kernel refused a whole operation (not a per-page outcome)."""

    exit_code = EX_OSERR

    def __init__(self, op: str, errno_: int, detail: str = "") -> None:
        import os

        self.op = op
        self.errno = errno_
        self.detail = detail
        msg = f"{op}: {os.strerror(errno_)} (errno {errno_})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
