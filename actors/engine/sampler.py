"""Token sampling and the logits processors, one definition used by plain sampling and by speculative
verification (speculation.accept_draft), so both draw from the same distribution.

Order, per row of one request (`apply_processors`, then `processed_logits`):
    logit_bias, min_tokens (EOS and stop token ids masked), repetition penalty (prompt + output tokens),
    presence / frequency penalties (output tokens), grammar mask; then temperature, min_p, top-k, top-p.
(min_tokens' -inf is applied after the grammar mask: the same result, except where the grammar allows only stops.)
A greedy request takes the argmax of the logits after the processors. Requests without processors
(`SamplingParams.has_processors`) skip `apply_processors` entirely. Logprobs (`token_logprobs`) are computed from
the raw logits, before any of this.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from specserve.actors.engine.messages import TokenLogprobs
from specserve.actors.engine.sampling_params import SamplingParams


def apply_processors(logits: torch.Tensor, params: SamplingParams, token_ids: list[int], num_prompt_tokens: int,
                     draft: list[int], eos_token_ids: Collection[int], bitmask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The history-dependent processors on rows [R, V] (float32) of one request; returns a new tensor. (min_tokens
    is applied last: see `_mask_early_stops`.)

    Row i is the distribution after `token_ids` (prompt, then output so far) extended by draft[:i]: a
    verification's rows each see the tokens before them. `bitmask`: the grammar's packed allowed-token masks for
    these R rows (structured.apply_masks), or None."""
    logits = logits.float().clone()
    rows, vocab = logits.shape
    device = logits.device
    if params.logit_bias:
        ids = [t for t in params.logit_bias if t < vocab]
        if ids:
            bias = torch.tensor([params.logit_bias[t] for t in ids], device=device)
            logits[:, torch.tensor(ids, device=device)] += bias
    penalize_output = params.presence_penalty or params.frequency_penalty
    if params.repetition_penalty != 1.0 or penalize_output:
        counts = _output_counts(token_ids[num_prompt_tokens:], draft[:rows - 1], rows, vocab, device)
        if params.repetition_penalty != 1.0:
            seen = counts > 0
            prompt = torch.tensor(token_ids[:num_prompt_tokens], dtype=torch.long, device=device)
            seen[:, prompt[prompt < vocab]] = True
            penalized = torch.where(logits > 0, logits / params.repetition_penalty,
                                    logits * params.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if penalize_output:
            logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if bitmask is not None:
        from specserve.actors.engine.structured import apply_masks  # the grammar engine: only requests using it
        apply_masks(logits, bitmask)
    _mask_early_stops(logits, params, len(token_ids) - num_prompt_tokens, eos_token_ids)
    return logits


def _mask_early_stops(logits: torch.Tensor, params: SamplingParams, num_output: int,
                      eos_token_ids: Collection[int]) -> None:
    """min_tokens: EOS and the stop token ids get -inf in the rows before the minimum, in place. Done last (a -inf
    entry is left so by every other processor, so the order does not matter) to keep a row the grammar allows
    only stops at: there the grammar wins, as nothing else may follow."""
    if not params.min_tokens or num_output >= params.min_tokens:
        return
    vocab = logits.shape[1]
    stops = [t for t in set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids)) if t < vocab]
    if not stops:
        return
    rows = min(logits.shape[0], params.min_tokens - num_output)  # row i has num_output + i tokens before it
    masked = logits[:rows].clone()
    masked[:, torch.tensor(stops, device=logits.device)] = float("-inf")
    allowed = torch.isfinite(masked).any(dim=-1, keepdim=True)
    logits[:rows] = torch.where(allowed, masked, logits[:rows])


def _output_counts(output: list[int], draft: list[int], rows: int, vocab: int, device) -> torch.Tensor:
    """[rows, V] float occurrences of each token in the output, row i also counting draft[:i]."""
    counts = torch.zeros(rows, vocab, device=device)
    out = torch.tensor([t for t in output if t < vocab], dtype=torch.long, device=device)
    if out.numel():
        counts += torch.bincount(out, minlength=vocab)[:vocab].float()
    if draft:
        # Draft token j counts in rows j + 1 .. rows - 1.
        r = [row for j in range(len(draft)) for row in range(j + 1, rows)]
        c = [draft[j] for j in range(len(draft)) for _ in range(j + 1, rows)]
        counts.index_put_((torch.tensor(r, device=device), torch.tensor(c, device=device)),
                          torch.ones(len(r), device=device), accumulate=True)
    return counts


def processed_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then min_p, top-k, top-p on one or more rows of float32 logits ([..., V]) of one request."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if params.min_p > 0.0:
        # p < min_p * p_max  <=>  logit < max logit + log(min_p)
        floor = logits.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(params.min_p))
        logits = logits.masked_fill(logits < floor, float("-inf"))
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


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of `logits` [..., V]: the first index of the row's maximum, as argmax picks it
    (NaN counts as the maximum in both). max's reduction is about 3x faster than argmax's on CPU over a
    vocabulary-wide float32 row (49k entries: 0.4 vs 1.2 ms for 16 rows on one core), and a verifying step
    takes it over every draft row."""
    return logits.max(dim=-1).indices


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of `logits` [N, V] (float32, after `apply_processors` for the requests that have them)."""
    tokens = greedy_tokens(logits).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = processed_logits(logits[i].cpu(), p).softmax(-1)  # the generator is a CPU one
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens


def token_logprobs(raw_logits: torch.Tensor, tokens: list[int], num_top: int) -> list[TokenLogprobs]:
    """Logprobs of tokens[i] under row i of the model's raw logits [>= len(tokens), V], with the `num_top` most
    likely alternatives: float32 log_softmax, before any processor."""
    if not tokens:
        return []
    lsm = raw_logits[:len(tokens)].float().log_softmax(dim=-1)
    chosen = lsm.gather(1, torch.tensor(tokens, device=lsm.device)[:, None])[:, 0].tolist()
    if num_top:
        top = lsm.topk(min(num_top, lsm.shape[-1]), dim=-1)
        top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    else:
        top_ids = top_lps = [[] for _ in tokens]
    return [TokenLogprobs(t, lp, list(zip(ids, lps))) for t, lp, ids, lps in zip(tokens, chosen, top_ids, top_lps)]
