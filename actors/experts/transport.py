"""Transports that carry one MoE layer's dispatched rows to the shards that hold their experts and back."""

from __future__ import annotations

import torch

from specserve.actors.experts.dispatch import ExpertRows, split_by_owner
from specserve.actors.experts.expert_shard import ExpertShard


def _owner_rows(rows: torch.Tensor, counts: list[int], positions: list[int], offsets: list[int]) -> torch.Tensor:
    return torch.cat([rows[o:o + counts[p]] for p, o in zip(positions, offsets)])


class LocalTransport:
    """Shards in this process (tests, and the reference the actor transport is checked against)."""

    def __init__(self, shards: list[ExpertShard], placement: dict[tuple[int, int], int]):
        self.shards = shards
        self.placement = placement  # (layer, expert) -> shard index

    def run(self, layer: int, plan: list[ExpertRows], rows: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor | None] = [None] * len(plan)
        for shard, (positions, offsets) in split_by_owner(plan, counts,
                                                          lambda e: self.placement[(layer, e)]).items():
            experts = [plan[p].expert for p in positions]
            n = [counts[p] for p in positions]
            out = self.shards[shard].run(layer, experts, n, _owner_rows(rows, counts, positions, offsets))
            start = 0
            for p, k in zip(positions, n):
                outputs[p] = out[start:start + k]
                start += k
        return outputs
