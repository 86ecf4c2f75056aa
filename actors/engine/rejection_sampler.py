"""Verification of draft tokens: which of them the target model accepts, and the one token it adds.

Greedy requests accept while the draft equals the target argmax. Sampled requests use standard speculative
rejection sampling (Leviathan et al., Chen et al.): accept draft token d at position i with probability
min(1, p_i(d) / q_i(d)); on the first rejection draw from normalize(max(0, p_i - q_i)); when every draft token
passes, draw a bonus token from p_k. p and q are taken after the same logits processors (temperature, top-k,
top-p). A deterministic draft (n-gram, greedy draft model) has a one-hot q. The committed tokens are then
distributed exactly as plain sampling from the target would produce them.
"""

from __future__ import annotations

import torch

from specserve.actors.engine.sampler import processed_logits
from specserve.actors.engine.sampling_params import SamplingParams


def verify_draft(target_logits: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
                 params: SamplingParams, generator: torch.Generator) -> list[int]:
    """Tokens to commit for one sequence: the accepted prefix of `draft_tokens` plus one target token.

    target_logits: float32 [k + 1, V], the target's logits at the last committed token and at each draft token.
    draft_probs: [k, V] draft distributions (after the same processors), or None for a deterministic draft.
    """
    k = len(draft_tokens)
    assert target_logits.shape[0] == k + 1, (target_logits.shape, k)
    if params.greedy:
        target = target_logits.argmax(dim=-1).tolist()
        out: list[int] = []
        for i, d in enumerate(draft_tokens):
            if d != target[i]:
                break
            out.append(d)
        out.append(target[len(out)])
        return out

    # On the CPU, where the per-request generator lives (k + 1 rows: cheap to move).
    p = processed_logits(target_logits.float().cpu(), params).softmax(dim=-1)  # [k + 1, V]
    out = []
    for i, d in enumerate(draft_tokens):
        q_d = float(draft_probs[i, d]) if draft_probs is not None else 1.0
        u = float(torch.rand((), generator=generator))
        if q_d > 0 and u * q_d < float(p[i, d]):  # u < p/q, i.e. accepted with probability min(1, p/q)
            out.append(d)
            continue
        if draft_probs is not None:
            residual = (p[i] - draft_probs[i].to(p.dtype)).clamp_min(0)
        else:
            residual = p[i].clone()
            residual[d] = 0.0
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is exact
            residual = p[i]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[k], 1, generator=generator)))
    return out
