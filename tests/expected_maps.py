"""The tier map each proving-ground topology must produce: one description shared by the fixture tests (on trees
captured from the guests) and the guest tests (on the live guest kernel), so both speak of the same machines.

Per node: (tier, class, kind, demotion path, promotion targets).
"""

from __future__ import annotations

NodeSummary = tuple[str, str, str, tuple[int, ...], tuple[int, ...]]

DRAM_0_TO_1: dict[int, NodeSummary] = {
    0: ("dram", "system-ram", "dram", (1,), ()),
    1: ("near", "near", "unknown", (), (0,)),
}

EXPECTED: dict[str, dict[int, NodeSummary]] = {
    "host-1node": {0: ("dram", "system-ram", "dram", (), ())},
    "tiered": DRAM_0_TO_1,
    # no HMAT: the kernel puts node 1 in memory_tier4 with DRAM; tierd still sees slower memory (and says so)
    "tiered-nohmat": DRAM_0_TO_1,
    # node 2 is the emulated CXL type-3 device, onlined at runtime through a CXL region and dax/kmem
    "cxl": {
        0: ("dram", "system-ram", "dram", (1, 2), ()),
        1: ("near", "near", "unknown", (), (0,)),
        2: ("cxl", "near", "cxl", (), (0,)),
    },
    # each socket demotes to its own far node first
    "two-socket": {
        0: ("dram", "system-ram", "dram", (2, 3), ()),
        1: ("dram", "system-ram", "dram", (3, 2), ()),
        2: ("near", "near", "unknown", (), (0, 1)),
        3: ("near", "near", "unknown", (), (1, 0)),
    },
}


def summarise(tiermap: object) -> dict[int, NodeSummary]:
    from tierd.classify import TierMap

    assert isinstance(tiermap, TierMap)
    return {n.node_id: (n.tier, n.klass.value, n.kind.value, n.demotion_path, n.promotion_targets)
            for n in tiermap.nodes}
