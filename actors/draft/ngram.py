"""Model-free drafts: prompt lookup over the sequence's own tokens, then recycled target guesses.

Prompt lookup (as in vLLM's n-gram speculator / PLD): find the most recent earlier occurrence of the
sequence's last n tokens (longest n first) and propose the tokens that followed it. Input-copying tasks
(edits, summaries, code) repeat long spans, so these drafts are accepted in long runs.

Recycled candidates (after Token Recycling): every verifier forward yields the target's argmax after each
input token, including at draft positions that were later rejected. They are kept in a table token -> the
target's latest guess of the next token, shared by all sequences, and chained to extend or replace a lookup.
Runs inside the verifier: it costs microseconds, so a remote call would only add latency.
"""

from __future__ import annotations

from specserve.actors.engine.speculation import Draft


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
    drafts_are_free = True
    prior_acceptance = 0.3

    def __init__(self, min_n: int, max_n: int, *, recycle: bool):
        if not 1 <= min_n <= max_n:
            raise ValueError("n-gram sizes need 1 <= min_n <= max_n")
        self.min_n, self.max_n, self.recycle = min_n, max_n, recycle
        self.observes_target = recycle
        self.indexes: dict[str, NgramIndex] = {}
        self.recycled: dict[int, int] = {}

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
            if self.recycle:
                last = tokens[-1] if tokens else seq.token_ids[-1]
                while len(tokens) < k and last in self.recycled:
                    last = self.recycled[last]
                    tokens.append(last)
            drafts.append(Draft(tokens) if tokens else None)
        return drafts

    def observe(self, seq, input_tokens: list[int], target_argmax: list[int]) -> None:
        if self.recycle:
            self.recycled.update(zip(input_tokens, target_argmax))

    def release(self, seq) -> None:
        self.indexes.pop(seq.seq_id, None)
