"""Which channels to cut: per group (``ranking="local"``) or across the groups of a scope
(``ranking="global"``), from the importance scores; the result is the typed ``PrunePlan``."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from onnxcomp.passes.prune.config import Config
from onnxcomp.passes.prune.dims import Group


@dataclass
class PrunePlan:
    """The groups found (in graph order), and for each group to cut the indices to remove."""

    config: Config
    groups: list[Group]
    removed: dict[int, list[int]] = field(default_factory=dict)
    importance: str = "l2"
    # Each If/Loop/Scan body pruned as a graph of its own (``bodies.BodyPlan``), deepest last.
    bodies: list = field(default_factory=list)

    def cuts(self) -> bool:
        """Whether any channel goes, here or in a body."""
        return bool(self.removed) or any(b.plan.removed for b in self.bodies)

    def kept(self, group: Group) -> list[int]:
        gone = set(self.removed.get(group.id, ()))
        return [i for i in range(group.size or 0) if i not in gone]

    def describe(self) -> list[dict]:
        """One row per group, with the reason a group is kept."""
        return [{"group": g.id, "kind": g.kind, "size": g.size,
                 "remove": len(self.removed.get(g.id, [])), "nodes": len(g.nodes),
                 "first": g.nodes[0] if g.nodes else "", "kept_because": g.reason or ""}
                for g in self.groups]


def count(config: Config, group: Group, ratio: float) -> int:
    """Channels a local ratio removes: rounded down, ``multiple`` applied to the kept count
    (not to heads), at least ``min_channels`` kept."""
    n = math.floor(ratio * group.size + 1e-9)
    if config.multiple > 1 and group.kind != "heads" and n:
        keep = -(-(group.size - n) // config.multiple) * config.multiple  # round the kept count up
        n = max(0, group.size - keep)
    return max(0, min(n, group.size - config.min_channels))


def choose(config: Config, groups: list[Group], scores: dict[int, np.ndarray]
           ) -> dict[int, list[int]]:
    """The lowest-scored indices of each prunable group, sorted; groups cutting none are left
    out."""
    removed: dict[int, list[int]] = {}
    if config.ranking == "local":
        for g in groups:
            n = count(config, g, config.ratio_for(g.kind))
            if n:
                removed[g.id] = sorted(np.argsort(scores[g.id], kind="stable")[:n].tolist())
        return removed
    by_scope: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        by_scope[g.kind].append(g)
    for kind, members in by_scope.items():
        budget = math.floor(config.ratio_for(kind) * sum(g.size for g in members) + 1e-9)
        # Scores are normalized per group so that one scale ranks channels of every group.
        pool = sorted((float(s) / (float(scores[g.id].mean()) or 1.0), g.id, int(i))
                      for g in members for i, s in enumerate(scores[g.id]))
        sizes = {g.id: g.size for g in members}
        for _score, gid, index in pool:
            if budget == 0:
                break
            if sizes[gid] - len(removed.get(gid, [])) <= config.min_channels:
                continue
            removed.setdefault(gid, []).append(index)
            budget -= 1
    for indices in removed.values():
        indices.sort()
    return removed
