"""Speculative decoding: the round the engine runs around each forward, and how much to speculate.

A round, per decoding sequence (the engine calls these around its step):
  1. `draft_round`: the proposer drafts up to k tokens past the sequence's last committed token, k chosen by
     the `SpeculationController` (below).
  2. The engine's forward runs the last committed token plus the k draft tokens, writing KV for all 1 + k.
  3. `verify_round`: the target's logits, after the request's logits processors (sampler.apply_processors, row i
     seeing the history extended by draft[:i]), decide what commits (`accept_draft`): the accepted prefix of the
     draft plus one token of the target's own. The KV of the rejected positions is rolled back by not
     counting it as computed; later forwards overwrite it.
  4. `record_round`: acceptance counts, and the proposer sees what the target predicted.

How much to speculate: `SpeculationController.choose` picks a k per decoding sequence that maximises goodput,
the expected committed tokens per second of the whole step:

    sum_i E_i(k_i) / (verify_cost(total tokens in the step) + draft_cost(max_i k_i))

with E(k) = 1 + a + a^2 + ... + a^k the expected tokens committed by a round that drafts k tokens at per-token
acceptance a (the bonus/correction token always commits). Acceptance is tracked per request (discounted counts,
seeded with the method's running average); the two costs are linear models fitted online from measured step
and draft times. k = 0 is chosen when speculation does not pay: low acceptance, or a batch large enough that the
extra verified tokens cost more than they return. A fixed-k mode is kept for comparison.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from specserve.actors.engine.sampler import greedy_tokens, processed_logits
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.speculation_gate import SpeculationGate

if TYPE_CHECKING:  # sequence.py imports this module (SpeculationStats)
    from specserve.actors.engine.sequence import Sequence


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V] for sampled drafts; None for deterministic ones
    # A sampled draft cut where its next token broke the grammar: the distribution that token was drawn from.
    # The target rejects such a token for sure, so its own token is drawn from the residual against it.
    cut_probs: torch.Tensor | None = None
    # A draft tree: parents[i] in [-1, i) is node i's parent (-1: the sequence's last committed token); None: a
    # chain. Nodes are best-first (every parent before its children, siblings with distinct tokens), so the first
    # N nodes are a tree too. Trees are deterministic drafts (probs None).
    parents: list[int] | None = None
    # scores[i]: the proposer's estimate that node i is accepted (None: the engine's per-sequence estimate).
    scores: list[float] | None = None

    def __post_init__(self):
        if self.parents is not None:
            if len(self.parents) != len(self.tokens) or self.probs is not None:
                raise ValueError("a draft tree needs one parent per token and no draft distributions")
            if any(not -1 <= p < i for i, p in enumerate(self.parents)):
                raise ValueError(f"draft tree parents must precede their children: {self.parents}")
        if self.scores is not None and len(self.scores) != len(self.tokens):
            raise ValueError("a draft's scores need one per token")

    def truncated(self, n: int) -> Draft:
        """The first n tokens (a tree's first n nodes are a tree: parents come first)."""
        return Draft(self.tokens[:n], self.probs[:n] if self.probs is not None else None, None,
                     self.parents[:n] if self.parents is not None else None,
                     self.scores[:n] if self.scores is not None else None)

    def within_depth(self, depth: int) -> Draft | None:
        """The draft without tokens deeper than `depth` (None if nothing is left)."""
        if self.parents is None:
            return self.truncated(depth) if depth > 0 and self.tokens else None
        depths = tree_depths(self.parents)
        keep = [j for j, d in enumerate(depths) if d <= depth]
        if len(keep) == len(self.tokens):
            return self
        if not keep:
            return None
        index = {j: i for i, j in enumerate(keep)}
        return Draft([self.tokens[j] for j in keep], None, None, [index.get(self.parents[j], -1) for j in keep],
                     [self.scores[j] for j in keep] if self.scores is not None else None)

    def main_path(self) -> Draft:
        """A tree's chain of first children (the best-first path); a chain itself."""
        if self.parents is None:
            return self
        keep, node = [], -1
        for j, p in enumerate(self.parents):
            if p == node:
                keep.append(j)
                node = j
        return Draft([self.tokens[j] for j in keep], None, None, None,
                     [self.scores[j] for j in keep] if self.scores is not None else None)


def tree_depths(parents: list[int]) -> list[int]:
    """Each node's depth: 1 for a child of the last committed token."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


def tree_ancestors(parents: list[int]) -> torch.Tensor:
    """[N, N] bool: row i is True at node i and at its ancestors, the draft tokens node i attends to."""
    anc = torch.eye(len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    return anc


class Proposer(Protocol):
    """Where draft tokens come from: the n-gram proposer in the verifier, or a client of drafter replicas.

    `drafts_are_free`: drafting costs (almost) nothing and its length is known only after looking (n-gram), so
    the engine proposes first and chooses k within what was found; otherwise it chooses k first."""

    drafts_are_free: bool
    prior_acceptance: float
    # How many of the target's likeliest next tokens after each input token `observe` shows it after every
    # forward (0: not called).
    observes_target: int

    def propose(self, seqs: list, ks: list[int]) -> list[Draft | None]: ...

    def observe(self, seq, input_tokens: list[int], guesses: TargetGuesses) -> None: ...

    def release(self, seq) -> None: ...


@dataclass
class TargetGuesses:
    """The target's likeliest next tokens after each input token of a forward (row i: after input token i), from
    the logits after the request's processors, most likely first."""
    tokens: list[list[int]]
    probs: list[list[float]] | None  # their probabilities; None when only the argmax was asked for

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top: int) -> TargetGuesses:
        if top == 1:  # the argmax alone needs no normalisation over the vocabulary
            return cls([[t] for t in greedy_tokens(logits).tolist()], None)
        values, tokens = logits.topk(top, dim=-1)
        probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()
        return cls(tokens.tolist(), probs.tolist())

    def rows(self, r: slice) -> TargetGuesses:
        return TargetGuesses(self.tokens[r], self.probs[r] if self.probs is not None else None)


# ---- the round ----------------------------------------------------------------------------------------------
def draft_round(seqs: list[Sequence], proposer: Proposer, controller: SpeculationController, *,
                max_model_len: int) -> None:
    """Set each decoding sequence's `draft` for this step, or None."""
    for seq in seqs:
        if seq.acceptance is None:
            seq.acceptance = controller.new_estimate()
    limits = [_draft_limit(seq, controller.max_k, max_model_len) for seq in seqs]
    alphas = [s.acceptance.value for s in seqs]
    idle = [s.rounds_without_draft for s in seqs]
    if proposer.drafts_are_free:  # look first, then choose k within what was found
        # A tree may have more tokens than levels: `limits` bound its depth, the room left in the window its size.
        sizes = [min(controller.max_k, max_model_len - len(seq)) if lim else 0 for seq, lim in zip(seqs, limits)]
        drafts = [_chain_if_needed(seq, d.within_depth(lim) if d is not None else None)
                  for seq, d, lim in zip(seqs, proposer.propose(seqs, sizes), limits)]
        limits = [len(d.tokens) if d else 0 for d in drafts]
        values = [_node_values(seq, d) if d is not None else None for seq, d in zip(seqs, drafts)]
        ks = controller.choose(alphas, limits, idle, node_values=values)
    else:  # drafting costs a forward per token: choose k first
        ks = controller.choose(alphas, limits, idle)
        t0 = time.perf_counter()
        drafts = proposer.propose(seqs, ks) if any(ks) else [None] * len(seqs)
        drafts = [_chain_if_needed(seq, d) for seq, d in zip(seqs, drafts)]
        controller.observe_draft(max(ks), time.perf_counter() - t0)
    for seq, k, draft in zip(seqs, ks, drafts):
        # A draft may be left with no tokens but a cut distribution: verified as a round of k = 0.
        seq.draft = _grammar_cut(seq, draft, k) if draft is not None and k else None
        if seq.num_draft_tokens == 0:
            seq.rounds_without_draft += 1
        else:
            seq.rounds_without_draft = 0


def _chain_if_needed(seq: Sequence, draft: Draft | None) -> Draft | None:
    """A tree reduced to its main path for a request whose logits processors or grammar read the history: they
    are applied along one path of draft tokens (sampler.apply_processors, the grammar's masks)."""
    if draft is None or draft.parents is None:
        return draft
    if seq.grammar is not None or seq.params.has_processors:
        return draft.main_path()
    return draft


def _node_values(seq: Sequence, draft: Draft) -> list[float] | None:
    """The expected acceptance of each node of `draft` for the controller: the proposer's scores, calibrated by
    how this sequence's earlier scored drafts fared; None (the per-token acceptance model) without scores."""
    if draft.scores is None:
        return None
    c = seq.acceptance.calibration
    values = [min(c * x, 0.999) for x in draft.scores]
    if c > 1.0 and draft.parents is not None:
        # Scaled up, siblings could together be worth more than their parent, but at most one of them is
        # accepted: each child gets at most what its earlier siblings left of its parent's value.
        used: dict[int, float] = {}
        for j, p in enumerate(draft.parents):
            left = (values[p] if p >= 0 else 1.0) - used.get(p, 0.0)
            values[j] = min(values[j], max(left, 0.0))
            used[p] = used.get(p, 0.0) + values[j]
    return values


def _grammar_cut(seq: Sequence, draft: Draft, k: int) -> Draft | None:
    """The first k tokens of `draft`, cut before the first one the sequence's grammar forbids (such tokens
    would only be rejected, and the grammar's masks are defined only along a valid path)."""
    draft = draft.truncated(k)
    if not draft.tokens:
        return None
    if draft.parents is not None or seq.grammar is None:  # trees have no grammar (see _chain_if_needed)
        return draft
    valid = seq.grammar.valid_prefix(draft.tokens)
    if valid == len(draft.tokens):
        return draft
    cut_probs = draft.probs[valid] if draft.probs is not None else None
    kept = draft.truncated(valid)
    if not kept.tokens:
        return None if cut_probs is None else Draft([], draft.probs[:0], cut_probs)
    return Draft(kept.tokens, kept.probs, cut_probs)


def _draft_limit(seq: Sequence, max_k: int, max_model_len: int) -> int:
    """The most tokens `seq` may draft this round."""
    # A seeded sampled request must repeat itself: drafts depend on other traffic (recycled guesses, adaptive
    # k) and would change how its generator is consumed, so it decodes without speculation.
    if not seq.params.speculate or (not seq.params.greedy and seq.params.seed is not None):
        return 0
    # Never draft past the end: tokens beyond max_tokens or the window would be thrown away.
    remaining = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - len(seq))
    return max(0, min(remaining - 1, max_k))


@dataclass
class Verified:
    """What a verified round commits: `tokens`; `rows`, the row of the round's logits each token was chosen
    from (a chain's are 0, 1, ...; a tree's follow the accepted path); `kv_moves`, (from position, to position)
    that put an accepted tree path's KV where its tokens now are."""
    tokens: list[int]
    rows: list[int]
    kv_moves: list[tuple[int, int]]


def verify_round(seq: Sequence, target_logits: torch.Tensor) -> Verified:
    """What `seq` commits after a forward over its last committed token and its draft. `target_logits` [k + 1, V]
    are the target's logits at each of those positions (row 1 + j: draft token j)."""
    draft = seq.draft
    start = seq.num_computed_tokens  # the last committed token's position
    if draft.parents is None:
        tokens = accept_draft(target_logits, draft.tokens, draft.probs, seq.params, seq.generator,
                              cut_probs=draft.cut_probs)
        verified = Verified(tokens, list(range(len(tokens))), [])
    else:
        # Node j's KV was written at position start + 1 + j; the accepted path's d-th node belongs at start + d.
        tokens, path = accept_tree(target_logits, draft.tokens, draft.parents, seq.params, seq.generator)
        verified = Verified(tokens, [0] + [1 + j for j in path],
                            [(start + 1 + j, start + 1 + d) for d, j in enumerate(path) if j != d])
    # KV rollback: the forward wrote KV for all 1 + k positions, but only the last committed token's and the
    # accepted draft tokens' is valid. Counting just those as computed leaves the rest to be overwritten.
    seq.num_computed_tokens += len(tokens)
    return verified


def accept_tree(target_logits: torch.Tensor, tokens: list[int], parents: list[int], params: SamplingParams,
                generator: torch.Generator) -> tuple[list[int], list[int]]:
    """The committed tokens of a verified draft tree (a path of accepted nodes plus one target token) and the
    accepted nodes. Row 0 of `target_logits` is the last committed token's, row 1 + j node j's.

    Greedy: follow the child whose token is the target's argmax, as long as there is one. Sampled (the nodes
    are deterministic drafts): at each node, try its children in order, accepting child c with probability
    r(c) / sum(r) where r starts as the target's distribution p at the node and loses the mass of each rejected
    child; when all are rejected, draw from r. Each token is then distributed as p, so the committed tokens are
    distributed exactly as plain sampling would produce them (recursive rejection sampling with one-hot drafts,
    as in SpecInfer / SpecTr-style multi-candidate verification)."""
    children: dict[int, list[int]] = {}
    for j, p in enumerate(parents):
        children.setdefault(p, []).append(j)
    out: list[int] = []
    path: list[int] = []
    node = -1
    if params.greedy:
        target = greedy_tokens(target_logits).tolist()
        while True:
            t = target[node + 1]
            out.append(t)
            node = next((c for c in children.get(node, ()) if tokens[c] == t), -2)
            if node == -2:
                return out, path
            path.append(node)
    while True:
        # Only the rows along the walk are read: process each when reached (a tree has many more rows than that).
        p = processed_logits(target_logits[node + 1:node + 2].float().cpu(), params).softmax(dim=-1)[0]
        residual = p.clone()
        accepted = -2
        for c in children.get(node, ()):
            d = tokens[c]
            u = float(torch.rand((), generator=generator))
            if u * float(residual.sum()) < float(residual[d]):
                accepted = c
                break
            residual[d] = 0.0
        if accepted == -2:
            if float(residual.sum()) <= 0.0:  # every token of mass drafted and rejected: only by rounding
                residual = p
            out.append(int(torch.multinomial(residual, 1, generator=generator)))
            return out, path
        out.append(tokens[accepted])
        path.append(accepted)
        node = accepted


def accept_draft(target_logits: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
                 params: SamplingParams, generator: torch.Generator, *, cut_probs: torch.Tensor | None = None
                 ) -> list[int]:
    """The accepted prefix of `draft_tokens` plus one target token.

    Greedy: accept while the draft equals the target argmax (of the processed logits). Sampled: speculative
    rejection sampling (Leviathan et al., Chen et al.): accept draft token d at position i with probability
    min(1, p_i(d) / q_i(d)); on the first rejection draw from normalize(max(0, p_i - q_i)); when every draft
    token passes, draw a bonus token from p_k (from normalize(max(0, p_k - cut_probs)) when the draft's next token was cut for breaking the
    grammar: it was drawn and would have been rejected). p is the target's distribution after the request's
    processors (sampler.apply_processors by the caller, then temperature / min_p / top-k / top-p here); q is
    whatever distribution the draft tokens were drawn from; a deterministic draft (n-gram, greedy draft model)
    has a one-hot q. The committed tokens are then distributed exactly as plain sampling from the target (with
    the same processors) would produce them.

    target_logits: float32 [k + 1, V], the target's processed logits at the last committed token and at each
    draft token (row i after the history extended by draft_tokens[:i]).
    draft_probs: [k, V] draft distributions, or None for a deterministic draft.
    """
    k = len(draft_tokens)
    assert target_logits.shape[0] == k + 1, (target_logits.shape, k)
    if params.greedy:
        target = greedy_tokens(target_logits).tolist()
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
    last = p[k]
    if cut_probs is not None:
        residual = (last - cut_probs.to(p.dtype)).clamp_min(0)
        last = residual if float(residual.sum()) > 0.0 else last
    out.append(int(torch.multinomial(last, 1, generator=generator)))
    return out


def record_round(seq: Sequence, k: int, tokens: list[int], proposer: Proposer, controller: SpeculationController,
                 guesses: TargetGuesses | None) -> None:
    """Count a round of `seq` that drafted k tokens (0: it decoded or completed its prompt without a draft) and
    committed `tokens`; show the proposer the target's guesses after each input token if it observes them."""
    if guesses is not None:
        proposer.observe(seq, [seq.token_ids[-1]] + (seq.draft.tokens if k else []), guesses)
    accepted = len(tokens) - 1
    draft = seq.draft if k else None
    # A tree's levels play the part of a chain's positions: acceptance by position is acceptance by depth.
    levels = max(tree_depths(draft.parents)) if draft is not None and draft.parents is not None else k
    seq.spec_stats.record(k, accepted, levels)
    controller.method_stats.record(k, accepted, levels)
    if seq.acceptance is not None:
        seq.acceptance.update(levels, accepted)
        if draft is not None and draft.scores is not None:
            seq.acceptance.calibrate(sum(draft.scores), accepted)
            controller.method_calibration.add(sum(draft.scores), accepted)


# ---- how much to speculate ----------------------------------------------------------------------------------
@dataclass
class SpeculationStats:
    """Counters for one request or one engine. Per-position counts index the draft position (0 = first)."""
    rounds: int = 0  # verification rounds that carried a draft
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    k_chosen: dict[int, int] = field(default_factory=dict)  # k -> decode rounds that chose it (0 included)

    def record(self, k: int, accepted: int, levels: int | None = None) -> None:
        """A round that verified k draft tokens and accepted `accepted`; `levels`: a tree's depth (a chain's k)."""
        self.k_chosen[k] = self.k_chosen.get(k, 0) + 1
        if k == 0:
            return
        levels = k if levels is None else levels
        self.rounds += 1
        self.draft_tokens += k
        self.accepted_tokens += accepted
        while len(self.drafted_at) < levels:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(levels):
            self.drafted_at[i] += 1
            if i < accepted:
                self.accepted_at[i] += 1

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens committed per speculative round (accepted drafts + the target's own token)."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else None

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_by_position": [a / d if d else None for a, d in zip(self.accepted_at, self.drafted_at)],
            "drafted_at": list(self.drafted_at),
            "accepted_at": list(self.accepted_at),
            "k_chosen": {str(k): n for k, n in sorted(self.k_chosen.items())},
        }


class ScoreCalibration:
    """How far to trust a proposer's scores: accepted tokens over the sum of the scores of the tokens verified,
    discounted per round and pulled toward `prior` while data is thin."""

    def __init__(self, prior: float = 1.0, prior_weight: float = 2.0, decay: float = 0.9):
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.accepted = 0.0
        self.predicted = 0.0

    def add(self, predicted: float, accepted: int) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.predicted = self.decay * self.predicted + predicted

    @property
    def value(self) -> float:
        return (self.accepted + self.prior_weight * self.prior) / (self.predicted + self.prior_weight)


class AcceptanceEstimate:
    """Per-token acceptance probability from discounted counts, pulled toward a prior while data is thin.

    A round that drafts k and accepts n observes n successes and, when n < k, one failure (the tokens after
    the first rejection are not observed)."""

    def __init__(self, prior: float, prior_weight: float = 2.0, decay: float = 0.9, calibration_prior: float = 1.0):
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.successes = 0.0
        self.trials = 0.0
        # Scored drafts (trees): this sequence's own record, starting from the method's (calibration_prior).
        self.scores = ScoreCalibration(calibration_prior, prior_weight, decay)

    def calibrate(self, predicted: float, accepted: int) -> None:
        self.scores.add(predicted, accepted)

    @property
    def calibration(self) -> float:
        """How far to trust a proposer's scores for this sequence."""
        return self.scores.value

    def update(self, k: int, accepted: int) -> None:
        if k <= 0:
            return
        trials = accepted + (1 if accepted < k else 0)
        keep = self.decay ** trials  # discount per observed token: about the last 1 / (1 - decay) tokens count
        self.successes = keep * self.successes + accepted
        self.trials = keep * self.trials + trials

    @property
    def value(self) -> float:
        a = (self.successes + self.prior_weight * self.prior) / (self.trials + self.prior_weight)
        return min(max(a, 0.0), 0.999)


class LinearCost:
    """seconds = a + b * x, fitted by least squares over recent samples plus two prior pseudo-samples (so the
    slope is defined before x has varied)."""

    def __init__(self, a0: float, b0: float, window: int = 128, prior_weight: float = 2.0):
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)
        self.prior = [(1.0, a0 + b0, prior_weight), (9.0, a0 + 9 * b0, prior_weight)]
        self.a, self.b = a0, b0

    def add(self, x: float, seconds: float) -> None:
        self.samples.append((x, seconds))
        pts = [(x, y, 1.0) for x, y in self.samples] + self.prior
        w = sum(p[2] for p in pts)
        mx = sum(p[0] * p[2] for p in pts) / w
        my = sum(p[1] * p[2] for p in pts) / w
        sxx = sum(p[2] * (p[0] - mx) ** 2 for p in pts)
        sxy = sum(p[2] * (p[0] - mx) * (p[1] - my) for p in pts)
        b = max(sxy / sxx, 0.0) if sxx > 0 else self.b
        self.a, self.b = max(my - b * mx, 0.0), b

    def __call__(self, x: float) -> float:
        return self.a + self.b * x


class ProportionalCost:
    """seconds = b * x (ratio estimate over recent samples): drafting k tokens is k sequential draft forwards
    (plus a catch-up prefill). A linear fit would be unidentifiable here, since most rounds draft the same k."""

    def __init__(self, b0: float, window: int = 128):
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)
        self.b = b0

    def add(self, x: float, seconds: float) -> None:
        self.samples.append((x, seconds))
        self.b = sum(y for _, y in self.samples) / max(sum(x for x, _ in self.samples), 1e-9)

    def __call__(self, x: float) -> float:
        return self.b * x


class SpeculationController:
    def __init__(self, max_k: int, *, adaptive: bool = True, prior_acceptance: float = 0.5,
                 verify_cost: tuple[float, float] = (0.025, 0.003), draft_cost: float = 0.0,
                 probe_every: int = 16, gate: SpeculationGate | None = None):
        self.max_k = max_k
        self.adaptive = adaptive
        # Whether a step drafts at all, by measured goodput at its batch size (None: always, k chosen below).
        self.gate = gate
        self.verify_cost = LinearCost(*verify_cost)
        self.draft_cost = ProportionalCost(draft_cost)  # x = the longest draft of the round
        self.method_stats = SpeculationStats()
        # Over all sequences: a new one starts from it. Suffix-tree scores on chat traffic claimed about 3.5x
        # the tokens accepted, and a request's own record is too short to learn that before it ends.
        self.method_calibration = ScoreCalibration(decay=0.995)
        self.prior_acceptance = prior_acceptance
        self.probe_every = probe_every

    def new_estimate(self) -> AcceptanceEstimate:
        """A new request starts from the method's running acceptance rate and calibration of scores."""
        rate = self.method_stats.acceptance_rate
        return AcceptanceEstimate(self.prior_acceptance if rate is None else rate,
                                  calibration_prior=self.method_calibration.value)

    def _seconds(self, tokens: int, max_k: int) -> float:
        return max(self.verify_cost(tokens) + (self.draft_cost(max_k) if max_k else 0.0), 1e-6)

    def choose(self, alphas: list[float], limits: list[int], idle_rounds: list[int], *,
               node_values: list[list[float] | None] | None = None) -> list[int]:
        """k per sequence. limits: the most each sequence may draft (remaining tokens, draft available);
        idle_rounds: rounds since the sequence last drafted (to probe a sequence whose estimate fell to k=0);
        node_values[i], when given: the expected acceptance of each of sequence i's draft tokens in order (a scored
        draft, e.g. a tree), used instead of the per-token model alphas[i]^depth."""
        caps = [min(self.max_k, lim) for lim in limits]
        if not self.adaptive or not caps:
            return caps
        top = max(caps)
        # expected[i][k]: expected committed tokens of sequence i verifying its first k draft tokens.
        expected = []
        for i, (a, c) in enumerate(zip(alphas, caps)):
            row, term = [1.0], 1.0
            values = node_values[i] if node_values is not None else None
            for j in range(c):
                if values is not None:
                    row.append(row[-1] + values[j])
                else:
                    term *= a
                    row.append(row[-1] + term)
            expected.append(row)
        # The step as if it carried decodes only. A prefill chunk beside them is the same work with or without
        # drafts; counted in, its time would make a draft row look cheap against the step (at 16 chat
        # sequences the engine drafted 5.3 tokens a step instead of 1.1, and ran 0.91x: docs/performance.md).
        base_tokens = len(caps)
        # Best uniform k first (captures the fixed draft cost), then a per-sequence pass that lowers k where
        # the sequence's acceptance does not pay for its extra verified tokens. Sums are updated, not redone.
        best_k, best = 0, sum(e[0] for e in expected) / self._seconds(base_tokens, 0)
        for k in range(1, top + 1):
            ks = [min(k, c) for c in caps]
            g = sum(e[x] for e, x in zip(expected, ks)) / self._seconds(base_tokens + sum(ks), k)
            if g > best:
                best_k, best = k, g
        ks = [min(best_k, c) for c in caps]
        total_e, total_k = sum(e[x] for e, x in zip(expected, ks)), sum(ks)
        for i in range(len(ks)):
            old = ks[i]
            max_others = max((x for j, x in enumerate(ks) if j != i), default=0)
            for k in range(old):
                e = total_e - expected[i][old] + expected[i][k]
                t = total_k - old + k
                g = e / self._seconds(base_tokens + t, max(max_others, k))
                if g > best:
                    best, ks[i] = g, k
            total_e += expected[i][ks[i]] - expected[i][old]
            total_k += ks[i] - old
        for i, idle in enumerate(idle_rounds):
            if ks[i] == 0 and caps[i] > 0 and idle >= self.probe_every:
                ks[i] = 1  # cheap probe so a sequence whose drafts became good again can recover
        return ks

    def observe_step(self, tokens: int, seconds: float) -> None:
        self.verify_cost.add(tokens, seconds)

    def observe_draft(self, max_k: int, seconds: float) -> None:
        if max_k > 0:
            self.draft_cost.add(max_k, seconds)
