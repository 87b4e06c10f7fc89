"""The kernel's NUMA memory policy ("mempolicy"), in one vocabulary for the syscalls and for /proc/PID/numa_maps.

``MemPolicyMode`` holds the kernel's ``MPOL_*`` numbers (include/uapi/linux/mempolicy.h) and knows each mode's
word in numa_maps (``from_numa_maps``/``numa_maps_word``); ``MemPolicyFlag`` the mode flags OR-ed into a mode.
``MemPolicy`` is the one value type: what get_mempolicy reports, what set_mempolicy and mbind are given, and what
numa_maps shows for a range (``parse_mempolicy``). All of it is pure.

In tierd the word "policy" alone names the daemon's decision engine; the kernel's thing is always "mempolicy".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

from tierd.kernel.fs import MAX_NODE_ID, format_cpulist, parse_cpulist


class MemPolicyMode(IntEnum):
    """Memory policy modes; the values are the kernel's ``MPOL_*`` numbers.

    ``str()`` gives tierd's name for the mode (``preferred-many``, ``weighted-interleave``); ``numa_maps_word``
    the kernel's word for it in /proc/PID/numa_maps (``prefer (many)``, ``weighted interleave``).
    """

    DEFAULT = 0
    PREFERRED = 1
    BIND = 2
    INTERLEAVE = 3
    LOCAL = 4
    PREFERRED_MANY = 5  # Linux 5.15
    WEIGHTED_INTERLEAVE = 6  # Linux 6.9

    def __str__(self) -> str:
        return self.name.lower().replace("_", "-")

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    @property
    def numa_maps_word(self) -> str:
        """How numa_maps spells this mode (mm/mempolicy.c ``policy_modes``)."""
        return _NUMA_MAPS_WORDS[self]

    @property
    def has_nodes(self) -> bool:
        """Whether the mode names nodes (every mode but default and local)."""
        return self not in (MemPolicyMode.DEFAULT, MemPolicyMode.LOCAL)

    @property
    def is_hard(self) -> bool:
        """bind and (weighted) interleave restrict allocation; the preferred modes only state a preference."""
        return self in (MemPolicyMode.BIND, MemPolicyMode.INTERLEAVE, MemPolicyMode.WEIGHTED_INTERLEAVE)

    @classmethod
    def from_numa_maps(cls, word: str) -> MemPolicyMode:
        """The mode numa_maps spells ``word`` (``prefer``, ``prefer (many)``, ...). Raises ValueError."""
        try:
            return _MODES_BY_WORD[word]
        except KeyError:
            raise ValueError(f"unknown memory policy mode {word!r}") from None


_NUMA_MAPS_WORDS: Final[Mapping[MemPolicyMode, str]] = {
    MemPolicyMode.DEFAULT: "default",
    MemPolicyMode.PREFERRED: "prefer",
    MemPolicyMode.BIND: "bind",
    MemPolicyMode.INTERLEAVE: "interleave",
    MemPolicyMode.LOCAL: "local",
    MemPolicyMode.PREFERRED_MANY: "prefer (many)",
    MemPolicyMode.WEIGHTED_INTERLEAVE: "weighted interleave",
}
_MODES_BY_WORD: Final[Mapping[str, MemPolicyMode]] = {
    **{word: mode for mode, word in _NUMA_MAPS_WORDS.items()},
    "preferred": MemPolicyMode.PREFERRED,
}
#: numa_maps words of more than one token: a line's mempolicy runs past the first space for these.
MULTIWORD_MODES: Final[tuple[str, ...]] = tuple(w for w in _NUMA_MAPS_WORDS.values() if " " in w)


class MemPolicyFlag(IntFlag):
    """Mode flags OR-ed into a mode for set_mempolicy/mbind, and reported back by get_mempolicy."""

    NUMA_BALANCING = 1 << 13  # Linux 5.15, MPOL_BIND only
    RELATIVE_NODES = 1 << 14
    STATIC_NODES = 1 << 15


#: numa_maps word (after ``=``) -> flag.
_FLAGS_BY_WORD: Final[Mapping[str, MemPolicyFlag]] = {
    "static": MemPolicyFlag.STATIC_NODES,
    "relative": MemPolicyFlag.RELATIVE_NODES,
    "balancing": MemPolicyFlag.NUMA_BALANCING,
}
_FLAG_WORDS: Final[Mapping[MemPolicyFlag, str]] = {flag: word for word, flag in _FLAGS_BY_WORD.items()}

MPOL_MODE_FLAGS: Final[int] = int(
    MemPolicyFlag.NUMA_BALANCING | MemPolicyFlag.RELATIVE_NODES | MemPolicyFlag.STATIC_NODES
)


def split_mode(raw: int) -> tuple[MemPolicyMode, MemPolicyFlag]:
    """A mode as get_mempolicy reports it -> (mode, mode flags). Raises ValueError for an unknown mode."""
    return MemPolicyMode(raw & ~MPOL_MODE_FLAGS), MemPolicyFlag(raw & MPOL_MODE_FLAGS)


@dataclass(frozen=True, slots=True)
class MemPolicy:
    """A NUMA memory policy: a thread's or a range's (numa_maps shows the VMA's own, else the task's).

    ``nodes`` are the policy's nodes (empty for default and local); ``flags`` its mode flags.
    """

    mode: MemPolicyMode = MemPolicyMode.DEFAULT
    nodes: frozenset[int] = frozenset()
    flags: MemPolicyFlag = MemPolicyFlag(0)

    @classmethod
    def from_raw(cls, raw: int, nodes: Iterable[int]) -> MemPolicy:
        """From get_mempolicy's mode (flags included) and nodes. Raises ValueError for an unknown mode."""
        mode, flags = split_mode(raw)
        return cls(mode, frozenset(nodes), flags)

    @property
    def raw_mode(self) -> int:
        """The mode with its flags OR-ed in, as set_mempolicy and mbind take it."""
        return int(self.mode) | int(self.flags)

    @property
    def is_hard(self) -> bool:
        """bind and (weighted) interleave restrict allocation; preferred modes only state a preference."""
        return self.mode.is_hard

    def allows(self, node: int) -> bool:
        """Whether moving pages under this mempolicy to ``node`` keeps to it.

        bind, interleave, weighted-interleave, preferred and preferred-many: ``node`` must be one of the mempolicy's
        nodes (moving a preferred range elsewhere would undo what its owner asked for). default and local: any node.
        """
        if self.mode.has_nodes:
            return node in self.nodes
        return True

    def __str__(self) -> str:
        """tierd's spelling: ``bind=static:0-2,4``, ``preferred-many:1-2``, ``local``."""
        text = str(self.mode)
        if self.flags:
            text += "=" + "|".join(sorted(_FLAG_WORDS[f] for f in MemPolicyFlag if f in self.flags))
        if self.nodes:
            text += ":" + format_cpulist(self.nodes)
        return text


DEFAULT_MEMPOLICY: Final = MemPolicy()


def parse_mempolicy(text: str) -> MemPolicy:
    """Parse a numa_maps mempolicy such as ``bind:0-1``, ``bind=static:1``, ``prefer (many):0,2``, ``local``.

    ``prefer`` without nodes (older kernels' local allocation) becomes local. Flag words the kernel may add later
    are ignored. Raises ValueError on an unknown mode or a malformed node list.
    """
    head, _, nodes_s = text.strip().partition(":")
    word, _, flags_s = head.partition("=")
    mode = MemPolicyMode.from_numa_maps(word)
    nodes = parse_cpulist(nodes_s, MAX_NODE_ID)
    if mode is MemPolicyMode.PREFERRED and not nodes:
        mode = MemPolicyMode.LOCAL
    flags = MemPolicyFlag(0)
    for f in flags_s.split("|"):
        flags |= _FLAGS_BY_WORD.get(f, MemPolicyFlag(0))
    return MemPolicy(mode, nodes, flags)


__all__ = [
    "DEFAULT_MEMPOLICY",
    "MPOL_MODE_FLAGS",
    "MULTIWORD_MODES",
    "MemPolicy",
    "MemPolicyFlag",
    "MemPolicyMode",
    "parse_mempolicy",
    "split_mode",
]
