"""Transports that carry one MoE layer's dispatched rows to the shards that hold their experts and back."""

from __future__ import annotations

import torch

from specserve.actors.experts.dispatch import ExpertRows, owner_message, scatter_outputs, split_by_owner
from specserve.actors.experts.expert_shard import ExpertShard


class LocalTransport:
    """Shards in this process (tests, and the reference the actor transports are measured against)."""

    def __init__(self, shards: list[ExpertShard], placement: dict[tuple[int, int], int]):
        self.shards = shards
        self.placement = placement  # (layer, expert) -> shard index

    def start(self, layer: int, plan: list[ExpertRows], rows: torch.Tensor, counts: list[int]) -> tuple:
        return layer, plan, rows, counts  # computed in finish: nothing runs in the background here

    def finish(self, pending: tuple) -> list[torch.Tensor]:
        layer, plan, rows, counts = pending
        outputs: list[torch.Tensor | None] = [None] * len(plan)
        groups = split_by_owner(plan, counts, lambda e: self.placement[(layer, e)])
        for shard, (positions, offsets) in groups.items():
            experts, n, part = owner_message(plan, rows, counts, positions, offsets)
            scatter_outputs(outputs, positions, counts, self.shards[shard].run(layer, experts, n, part))
        return outputs

    def run(self, layer: int, plan: list[ExpertRows], rows: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        return self.finish(self.start(layer, plan, rows, counts))
