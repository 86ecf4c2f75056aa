"""Token sampling: greedy, temperature, top-k, top-p, with a per-request generator.

`processed_logits` is kept separate so speculative decoding can apply the same processors to target and
draft distributions before rejection sampling.
"""

from __future__ import annotations

import torch

from specserve.actors.engine.sampling_params import SamplingParams


def processed_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on one or more rows of float32 logits ([..., V]) of one request."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first token always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of `logits` [N, V] (float32)."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = processed_logits(logits[i].cpu(), p).softmax(-1)  # the generator is a CPU one
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens
