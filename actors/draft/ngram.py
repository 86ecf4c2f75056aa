"""Model-free drafts: prompt lookup over the sequence's own tokens, then recycled target guesses.

Prompt lookup (as in vLLM's n-gram speculator / PLD): find the most recent earlier occurrence of the
sequence's last n tokens (longest n first) and propose the tokens that followed it. Input-copying tasks
(edits, summaries, code) repeat long spans, so these drafts are accepted in long runs.

Recycled candidates (after Token Recycling): every verifier forward yields the target's argmax after each
input token, including at draft positions that were later rejected. They are kept in a table token -> the
target's latest guess of the next token, shared by all sequences, and chained to extend or replace a lookup.
With `recycle_width` > 1 the table keeps each token's top guesses with their probabilities, and a sequence
without a lookup match drafts a tree of them instead.
Runs inside the verifier: it costs microseconds, so a remote call would only add latency.
"""

from __future__ import annotations

import heapq
import itertools

from specserve.actors.engine.speculation import Draft, TargetGuesses


class NgramIndex:
    """For n in [min_n, max_n]: n-gram -> position just after its latest occurrence, built incrementally."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.table: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # followers at positions < indexed are in the table

    def update(self, tokens: list[int]) -> None:
        # Index every n-gram that has a follower: the one ending at the last token has none yet.
        for pos in range(max(self.indexed, 1), len(tokens)):
            for n in range(self.min_n, self.max_n + 1):
                if pos >= n:
                    self.table[tuple(tokens[pos - n:pos])] = pos
        self.indexed = max(self.indexed, len(tokens))

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) <= n:
                continue
            pos = self.table.get(tuple(tokens[-n:]))
            if pos is not None:
                return tokens[pos:pos + k]
        return []


class NgramDrafter:
    """`recycle_width` > 1: where prompt lookup finds nothing, draft a tree from the recycled table instead of a
    chain: each token's `recycle_width` likeliest successors (with the target's probabilities, the tokens'
    scores), expanded best-first."""

    drafts_are_free = True
    prior_acceptance = 0.3

    def __init__(self, min_n: int, max_n: int, *, recycle: bool, recycle_width: int = 1,
                 min_token_prob: float = 0.05):
        if not 1 <= min_n <= max_n:
            raise ValueError("n-gram sizes need 1 <= min_n <= max_n")
        if recycle_width < 1:
            raise ValueError("recycle_width must be >= 1")
        self.min_n, self.max_n, self.recycle = min_n, max_n, recycle
        self.recycle_width = recycle_width if recycle else 1
        self.min_token_prob = min_token_prob
        self.observes_target = self.recycle_width if recycle else 0
        self.indexes: dict[str, NgramIndex] = {}
        # token -> the target's latest guesses of the next token (most likely first), with their probabilities
        # when drafting trees.
        self.recycled: dict[int, tuple[list[int], list[float] | None]] = {}

    def propose(self, seqs: list, ks: list[int]) -> list[Draft | None]:
        drafts: list[Draft | None] = []
        for seq, k in zip(seqs, ks):
            if k <= 0:
                drafts.append(None)
                continue
            index = self.indexes.get(seq.seq_id)
            if index is None:
                index = self.indexes[seq.seq_id] = NgramIndex(self.min_n, self.max_n)
            index.update(seq.token_ids)
            tokens = index.lookup(seq.token_ids, k)
            if self.recycle and not tokens and self.recycle_width > 1:
                drafts.append(self._recycled_tree(seq.token_ids[-1], k))
                continue
            if self.recycle:
                last = tokens[-1] if tokens else seq.token_ids[-1]
                while len(tokens) < k and last in self.recycled:
                    last = self.recycled[last][0][0]
                    tokens.append(last)
            drafts.append(Draft(tokens) if tokens else None)
        return drafts

    def _recycled_tree(self, last: int, k: int) -> Draft | None:
        """Up to k tokens best-first from the recycled guesses after `last` (score: the product of the target's
        probabilities along the path; children of a node are distinct, its top guesses)."""
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        heap: list[tuple[float, int, int, int]] = []  # (-score, tie-break, token, parent node)
        order = itertools.count()

        def push_children(token: int, node: int, score: float) -> None:
            guesses = self.recycled.get(token)
            if guesses is not None and guesses[1] is not None:
                for t, p in zip(*guesses):
                    if p >= self.min_token_prob:
                        heapq.heappush(heap, (-score * p, next(order), t, node))

        push_children(last, -1, 1.0)
        while heap and len(tokens) < k:
            neg, _, token, parent = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            scores.append(-neg)
            push_children(token, len(tokens) - 1, -neg)
        return Draft(tokens, parents=parents, scores=scores) if tokens else None

    def observe(self, seq, input_tokens: list[int], guesses: TargetGuesses) -> None:
        if self.recycle:
            probs = guesses.probs if guesses.probs is not None else [None] * len(guesses.tokens)
            self.recycled.update(zip(input_tokens, zip(guesses.tokens, probs)))

    def release(self, seq) -> None:
        self.indexes.pop(seq.seq_id, None)
