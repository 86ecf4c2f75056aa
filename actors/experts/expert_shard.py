"""The experts one shard holds, and their computation (the same ops as Hugging Face eager, so the same bits)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Unweighted output of one expert for rows `x`: gate_up is [2I, H] (gate rows first), down is [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(act(gate) * up, down)


class ExpertShard:
    """Weights of some (layer, expert) slots. `run` computes the rows of several experts of one layer, sent back to
    back, and returns their outputs back to back in the same order."""

    def __init__(self, weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
                 act: Callable[[torch.Tensor], torch.Tensor]):
        self.weights = weights  # (layer, expert) -> (gate_up [2I, H], down [H, I])
        self.act = act
        self.tokens: dict[tuple[int, int], int] = {}  # rows computed per (layer, expert), for load balancing

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.weights

    def run(self, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for expert, n in zip(experts, counts):
            gate_up, down = self.weights[(layer, expert)]
            outs.append(expert_forward(rows[start:start + n], gate_up, down, self.act))
            self.tokens[(layer, expert)] = self.tokens.get((layer, expert), 0) + n
            start += n
        return torch.cat(outs) if outs else rows[:0]
