"""tierd.kernel.mempolicy: the one mempolicy vocabulary (MPOL_* numbers, numa_maps words), parsing and semantics."""

from __future__ import annotations

import pytest

from tierd.kernel.mempolicy import (
    DEFAULT_MEMPOLICY,
    MemPolicy,
    MemPolicyFlag,
    MemPolicyMode,
    parse_mempolicy,
    split_mode,
)

F = MemPolicyFlag


# ---- the vocabulary -------------------------------------------------------------------------------------------


def test_modes_are_the_kernels_numbers() -> None:
    assert [(m.name, int(m)) for m in MemPolicyMode] == [
        ("DEFAULT", 0), ("PREFERRED", 1), ("BIND", 2), ("INTERLEAVE", 3), ("LOCAL", 4), ("PREFERRED_MANY", 5),
        ("WEIGHTED_INTERLEAVE", 6),
    ]
    assert [int(f) for f in (F.NUMA_BALANCING, F.RELATIVE_NODES, F.STATIC_NODES)] == [1 << 13, 1 << 14, 1 << 15]


@pytest.mark.parametrize(
    ("mode", "word", "name"),
    [
        (MemPolicyMode.DEFAULT, "default", "default"),
        (MemPolicyMode.PREFERRED, "prefer", "preferred"),
        (MemPolicyMode.BIND, "bind", "bind"),
        (MemPolicyMode.INTERLEAVE, "interleave", "interleave"),
        (MemPolicyMode.LOCAL, "local", "local"),
        (MemPolicyMode.PREFERRED_MANY, "prefer (many)", "preferred-many"),
        (MemPolicyMode.WEIGHTED_INTERLEAVE, "weighted interleave", "weighted-interleave"),
    ],
)
def test_numa_maps_words_and_names(mode: MemPolicyMode, word: str, name: str) -> None:
    assert mode.numa_maps_word == word
    assert MemPolicyMode.from_numa_maps(word) is mode
    assert str(mode) == name and f"{mode}" == name


def test_from_numa_maps_rejects_unknown_words() -> None:
    assert MemPolicyMode.from_numa_maps("preferred") is MemPolicyMode.PREFERRED  # accepted as before
    with pytest.raises(ValueError, match="unknown memory policy mode 'scatter'"):
        MemPolicyMode.from_numa_maps("scatter")


def test_split_mode_and_from_raw() -> None:
    assert split_mode(MemPolicyMode.BIND | F.STATIC_NODES) == (MemPolicyMode.BIND, F.STATIC_NODES)
    assert split_mode(4) == (MemPolicyMode.LOCAL, F(0))
    with pytest.raises(ValueError):
        split_mode(42)
    pol = MemPolicy.from_raw(int(MemPolicyMode.INTERLEAVE | F.RELATIVE_NODES), [0, 1])
    assert pol == MemPolicy(MemPolicyMode.INTERLEAVE, frozenset({0, 1}), F.RELATIVE_NODES)
    assert pol.raw_mode == 3 | (1 << 14)


# ---- numa_maps text -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "nodes", "flags"),
    [
        ("default", MemPolicyMode.DEFAULT, set(), F(0)),
        ("local", MemPolicyMode.LOCAL, set(), F(0)),
        ("bind:1", MemPolicyMode.BIND, {1}, F(0)),
        ("bind:0-2,5", MemPolicyMode.BIND, {0, 1, 2, 5}, F(0)),
        ("interleave:0-1", MemPolicyMode.INTERLEAVE, {0, 1}, F(0)),
        ("weighted interleave:0-2", MemPolicyMode.WEIGHTED_INTERLEAVE, {0, 1, 2}, F(0)),
        ("prefer:1", MemPolicyMode.PREFERRED, {1}, F(0)),
        ("prefer", MemPolicyMode.LOCAL, set(), F(0)),
        ("prefer (many):1-2", MemPolicyMode.PREFERRED_MANY, {1, 2}, F(0)),
        ("bind=static:1", MemPolicyMode.BIND, {1}, F.STATIC_NODES),
        ("interleave=relative:0-1", MemPolicyMode.INTERLEAVE, {0, 1}, F.RELATIVE_NODES),
        ("bind=static|balancing:1", MemPolicyMode.BIND, {1}, F.STATIC_NODES | F.NUMA_BALANCING),
        ("bind=balancing:0-1", MemPolicyMode.BIND, {0, 1}, F.NUMA_BALANCING),
        ("bind=future:1", MemPolicyMode.BIND, {1}, F(0)),  # flag words a later kernel adds are ignored
    ],
)
def test_parse_mempolicy(text: str, mode: MemPolicyMode, nodes: set[int], flags: MemPolicyFlag) -> None:
    assert parse_mempolicy(text) == MemPolicy(mode, frozenset(nodes), flags)


def test_parse_mempolicy_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown memory policy"):
        parse_mempolicy("scatter:0")


# ---- semantics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "allowed", "refused"),
    [
        ("default", {0, 1, 2}, set()),
        ("local", {0, 1, 2}, set()),
        ("bind:1", {1}, {0, 2}),
        ("bind=static:1", {1}, {0, 2}),
        ("interleave:0-1", {0, 1}, {2}),
        ("weighted interleave:0-2", {0, 1, 2}, {3}),
        ("prefer:1", {1}, {0, 2}),
        ("prefer (many):1-2", {1, 2}, {0}),
    ],
)
def test_mempolicy_allows(text: str, allowed: set[int], refused: set[int]) -> None:
    pol = parse_mempolicy(text)
    assert all(pol.allows(n) for n in allowed)
    assert not any(pol.allows(n) for n in refused)


def test_mempolicy_hardness_and_str() -> None:
    assert parse_mempolicy("bind:1").is_hard and parse_mempolicy("interleave:0-1").is_hard
    assert parse_mempolicy("weighted interleave:0-1").is_hard
    assert not parse_mempolicy("prefer:1").is_hard and not parse_mempolicy("default").is_hard
    assert str(parse_mempolicy("bind=static:0-2,4")) == "bind=static:0-2,4"
    assert str(parse_mempolicy("bind=static|balancing:1")) == "bind=balancing|static:1"
    assert str(parse_mempolicy("prefer (many):1-2")) == "preferred-many:1-2"
    assert str(DEFAULT_MEMPOLICY) == "default"
    assert parse_mempolicy("local") == MemPolicy(MemPolicyMode.LOCAL)
