"""Dispatch and combine for one MoE layer: which rows each expert gets, and how its outputs come back.

Hugging Face's eager experts loop visits hit experts in ascending order; each gets its rows ordered by (top-k
position, token), computes gate/up/down, scales by the routing weight and `index_add_`s into the output. Doing the
same split here, computing each expert's rows elsewhere with the same ops, and combining in the same order gives
bit-identical results. One stable sort replaces eager's per-expert `torch.where`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertRows:
    expert: int
    token_idx: torch.Tensor  # rows of the layer's hidden states, eager's order
    top_k_pos: torch.Tensor


def plan_dispatch(top_k_index: torch.Tensor, num_experts: int) -> list[ExpertRows]:
    """Per hit expert, ascending: its rows. Index `num_experts` (routers' "no expert") is skipped, as in eager."""
    num_tokens = top_k_index.shape[0]
    flat = top_k_index.t().reshape(-1)  # k-position major: entry k * T + t, so a stable sort keeps (k, t) order
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()
    plan, start = [], 0
    for expert, n in enumerate(counts):
        if n and expert < num_experts:
            idx = order[start:start + n]
            plan.append(ExpertRows(expert, idx % num_tokens, idx // num_tokens))
        start += n
    return plan


def gather_rows(hidden_states: torch.Tensor, plan: list[ExpertRows]) -> tuple[torch.Tensor, list[int]]:
    """All planned rows back to back (one tensor to send) and each expert's row count."""
    if not plan:
        return hidden_states[:0], []
    return hidden_states[torch.cat([p.token_idx for p in plan])], [len(p.token_idx) for p in plan]


def combine(hidden_states: torch.Tensor, plan: list[ExpertRows], outputs: list[torch.Tensor],
            top_k_weights: torch.Tensor) -> torch.Tensor:
    """Weight each expert's unweighted outputs and accumulate them in ascending expert order (eager's order)."""
    final = torch.zeros_like(hidden_states)
    for rows, out in zip(plan, outputs):
        out = out * top_k_weights[rows.token_idx, rows.top_k_pos, None]
        final.index_add_(0, rows.token_idx, out.to(final.dtype))
    return final


def split_by_owner(plan: list[ExpertRows], counts: list[int], owner_of) -> dict[object, tuple[list[int], list[int]]]:
    """owner -> (positions in `plan`, row offsets into the gathered rows) of the experts it computes; one message
    per owner per layer. `owner_of(expert)` names the owner."""
    out: dict[object, tuple[list[int], list[int]]] = {}
    offset = 0
    for i, (rows, n) in enumerate(zip(plan, counts)):
        positions, offsets = out.setdefault(owner_of(rows.expert), ([], []))
        positions.append(i)
        offsets.append(offset)
        offset += n
    return out


def owner_message(plan: list[ExpertRows], rows: torch.Tensor, counts: list[int], positions: list[int],
                  offsets: list[int]) -> tuple[list[int], list[int], torch.Tensor]:
    """(experts, row counts, their rows back to back) for one owner's positions."""
    part = torch.cat([rows[o:o + counts[p]] for p, o in zip(positions, offsets)])
    return [plan[p].expert for p in positions], [counts[p] for p in positions], part


def scatter_outputs(outputs: list, positions: list[int], counts: list[int], out: torch.Tensor) -> None:
    """Split one owner's reply (outputs back to back) into `outputs` at its plan positions."""
    start = 0
    for p in positions:
        outputs[p] = out[start:start + counts[p]]
        start += counts[p]
