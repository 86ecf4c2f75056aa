"""Suffix decoding: draft trees from how the context's suffix continued before, by frequency.

After the idea of SuffixDecoding (Oliaro et al.) and vLLM's suffix method, written from scratch. Two kinds of
`SuffixTree` (a depth-bounded suffix trie whose node counts are occurrences of the node's path; a path that
occurred once is read from its stream instead of built node by node, so a tree costs about a node per token):
  - one per request over its prompt and output (the last `max_request_tokens` of them), extended with the tokens
    appended since the previous step: repeated passages within a request (edits, code, multi-turn) are found;
  - one per tenant over the outputs of its finished requests (plus a few prompt tokens before each, so that the
    start of an output is matched too), bounded by a token cap over all tenants, evicted whole, oldest first:
    repeated work across requests (agentic loops, templated answers) is found. Tenants never see each other's.
A proposal matches the longest suffix of the context that has continuations in each tree, expands the most
likely continuations best-first into a tree (a node's score: the product of branch frequencies on its path),
with more nodes for longer matches, and keeps the candidate whose scores sum higher.
Runs inside the verifier like the n-gram proposer: O(max_depth) dict look-ups per new token and per proposal.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from specserve.actors.engine.speculation import Draft


class _Node:
    """A trie node: `count` occurrences of its path, `total` the sum of its children's counts (the occurrences
    that continue: the denominator of a branch's probability). Most nodes have a single child, so the first
    child is held inline (`token`, `child`) and only further ones in a dict (`more`).

    A node with one occurrence is a tail (`src` set): its subtree, a single chain, is not built but read from
    the stream that holds the occurrence, src[pos:] (to the depth bound). Most substrings of a long stream
    occur once, so this keeps about one node per token instead of one per token and depth. A tail that gains a
    second occurrence becomes an ordinary node with one (tail) child."""

    __slots__ = ("child", "count", "more", "pos", "src", "token", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.token = -1
        self.child: _Node | None = None
        self.more: dict[int, _Node] | None = None
        self.src: list[int] | None = None
        self.pos = 0

    def get(self, token: int) -> _Node | None:
        if self.token == token:
            return self.child
        more = self.more
        return more.get(token) if more is not None else None

    def add(self, token: int) -> _Node:
        node = _Node()
        if self.child is None:
            self.token, self.child = token, node
        elif self.more is None:
            self.more = {token: node}
        else:
            self.more[token] = node
        return node

    def drop(self, token: int) -> None:
        if self.token == token:
            if self.more:  # promote another child to the inline slot
                self.token, self.child = self.more.popitem()
                if not self.more:
                    self.more = None
            else:
                self.token, self.child = -1, None
        else:
            del self.more[token]
            if not self.more:
                self.more = None

    def items(self) -> Iterator[tuple[int, _Node]]:
        if self.child is not None:
            yield self.token, self.child
            if self.more is not None:
                yield from self.more.items()


class Stream:
    """A token stream being stored in a `SuffixTree`: its tokens (tails read their chains from them) and the
    cursor, the position in the tree of each of its suffixes shorter than the depth bound: suffix i + 1 tokens
    long is nodes[i] followed by the last offs[i] tokens of the stream (offs[i] > 0 only inside a tail)."""

    __slots__ = ("nodes", "offs", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.nodes: list[_Node] = []
        self.offs: list[int] = []


class SuffixTree:
    """Every substring of length <= `max_depth` of the stored token streams, with its number of occurrences.

    `extend` appends tokens to a `Stream` (O(max_depth) per token); `remove_start` takes back the substrings
    starting at one position of a stream (a sliding window), `remove` a whole stream; nodes whose count falls to
    zero are deleted, so a tree whose streams were all removed is back to its bare root. A node that fell back
    to one occurrence stays an ordinary node (it is not made a tail again)."""

    def __init__(self, max_depth: int):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2 (a pattern and a continuation), got {max_depth}")
        self.max_depth = max_depth
        self.root = _Node()
        self._num_nodes = 1

    @property
    def num_nodes(self) -> int:
        """Nodes held, the root included."""
        return self._num_nodes

    @property
    def num_tokens(self) -> int:
        """Token positions held (the root's count)."""
        return self.root.count

    def extend(self, stream: Stream, tokens: Sequence[int]) -> None:
        """Append `tokens` to `stream`: each new position adds one occurrence of every substring ending there."""
        root, depth, src = self.root, self.max_depth, stream.tokens
        for token in tokens:
            # The new token's position; it joins `src` only after the loop, so that a tail turned ordinary
            # below builds only the part of its chain already counted.
            j = len(src)
            root.count += 1
            nodes: list[_Node] = []
            offs: list[int] = []
            # The empty suffix (the root) and each kept suffix grow by `token`, shortest first: a tail turned
            # ordinary by a shorter suffix is then walked through by the longer ones inside it.
            for length, (node, off) in enumerate(zip((root, *stream.nodes), (0, *stream.offs)), start=1):
                if off and node.src is not None:
                    off += 1  # inside a tail: its chain is this very stream, which just grew by `token`
                else:
                    while off:  # the tail it was inside has branched since: walk down to where it now is
                        node = node.get(src[j - off])
                        off -= 1
                        if node.src is not None:
                            break
                    if off or node.src is not None:
                        off += 1
                    else:
                        child = node.get(token)
                        if child is None:
                            child = node.add(token)
                            child.src, child.pos = src, j + 1
                            self._num_nodes += 1
                        elif child.src is not None:
                            self._branch(child, length)
                        child.count += 1
                        node.total += 1
                        node, off = child, 0
                if length < depth:
                    nodes.append(node)
                    offs.append(off)
            stream.nodes, stream.offs = nodes, offs
            src.append(token)

    def _branch(self, tail: _Node, depth: int) -> None:
        """`tail` gains a second occurrence: build the first node of its chain (a tail itself)."""
        src, pos = tail.src, tail.pos
        tail.src = None
        if depth < self.max_depth and pos < len(src):
            child = tail.add(src[pos])
            child.count, child.src, child.pos = 1, src, pos + 1
            tail.total = 1
            self._num_nodes += 1

    def add(self, tokens: Sequence[int]) -> Stream:
        """Store a whole stream; the returned stream's tokens are what `remove` takes back."""
        stream = Stream()
        self.extend(stream, tokens)
        return stream

    def remove_start(self, tokens: Sequence[int], start: int) -> None:
        """Take back the substrings of a stored stream `tokens` that start at `start` (all of them must have been
        stored: the stream extends at least max_depth - 1 tokens past `start`, or to its end)."""
        node = self.root
        node.count -= 1
        detached = False
        for token in tokens[start:start + self.max_depth]:
            if node.src is not None:
                break  # the rest of the path is the tail's chain: no nodes of its own
            child = node.get(token)
            if child is None:
                raise ValueError(f"substring at {start} is not in the tree: removing a stream it does not hold")
            child.count -= 1
            node.total -= 1
            if child.count == 0:
                self._num_nodes -= 1
                if not detached:  # its whole subtree has count 0 now: cut it off once, count the rest below
                    node.drop(token)
                    detached = True
            node = child

    def remove(self, tokens: Sequence[int]) -> None:
        """Take back a whole stream stored with `add`: its `tokens`."""
        for start in range(len(tokens)):
            self.remove_start(tokens, start)

    def _walk(self, path: Sequence[int]) -> tuple[_Node, int] | None:
        """The position of `path` (a node and tokens into its tail), or None when it does not occur."""
        node, off = self.root, 0
        for token in path:
            if node.src is not None:
                i = node.pos + off
                if i >= len(node.src) or node.src[i] != token:
                    return None
                off += 1
            else:
                node = node.get(token)
                if node is None:
                    return None
        return node, off

    def occurrences(self, path: Sequence[int]) -> int:
        """How many times `path` (at most max_depth tokens) occurs in the stored streams."""
        if len(path) > self.max_depth:
            raise ValueError(f"paths longer than max_depth ({self.max_depth}) are not held")
        found = self._walk(path)
        return 0 if found is None else found[0].count

    def has_continuation(self, node: _Node, off: int, depth: int) -> bool:
        """Whether the position (node, off) at `depth` tokens from the root has a child."""
        if depth >= self.max_depth:
            return False
        if node.src is not None:
            return node.pos + off < len(node.src)
        return node.child is not None

    def match(self, context: Sequence[int], max_len: int) -> tuple[tuple[_Node, int] | None, int]:
        """The position of the longest suffix of `context`, at most `max_len` tokens, that occurred before with
        a continuation, and its length; (None, 0) when none did."""
        n = len(context)
        if n == 0 or self.root.get(context[-1]) is None:  # most contexts end in a token never seen: one look-up
            return None, 0
        for length in range(min(max_len, n, self.max_depth - 1), 0, -1):
            found = self._walk(context[n - length:])
            if found is not None and self.has_continuation(found[0], found[1], length):
                return found, length
        return None, 0

    def expand(self, position: tuple[_Node, int], depth: int, budget: int, min_prob: float
               ) -> tuple[list[int], list[int], list[float]]:
        """The `budget` most likely continuations of `position` (at `depth` tokens from the root) as a tree, best
        first: (tokens, parents, scores), parents[i] the index of node i's parent (-1: `position` itself),
        scores[i] the product of the branch probabilities (child count / sum of its siblings' counts) on its
        path. Branches whose probability is below `min_prob` are left out. Scores never increase along the
        list and parents come before children, so every prefix of the lists is a tree too."""
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        heap: list[tuple[float, int, int, _Node, int, int, int]] = []
        pushed = 0  # tie-break: equal scores come out in the order they were found

        def push(node: _Node, off: int, at: int, index: int, score: float) -> None:
            nonlocal pushed
            if at >= self.max_depth:
                return
            if node.src is not None:  # a tail: its chain goes on with probability 1
                i = node.pos + off
                if i < len(node.src):
                    heapq.heappush(heap, (-score, pushed, node.src[i], node, off + 1, at + 1, index))
                    pushed += 1
                return
            total, child = node.total, node.child
            if child is None:
                return
            least = min_prob * total
            if child.count >= least:
                heapq.heappush(heap, (-score * (child.count / total), pushed, node.token, child, 0, at + 1, index))
                pushed += 1
            if node.more is not None:
                for token, child in node.more.items():
                    if child.count >= least:
                        heapq.heappush(heap, (-score * (child.count / total), pushed, token, child, 0, at + 1, index))
                        pushed += 1

        push(position[0], position[1], depth, -1, 1.0)
        while heap and len(tokens) < budget:
            neg_score, _, token, node, off, at, parent = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            scores.append(-neg_score)
            push(node, off, at, len(tokens) - 1, -neg_score)
        return tokens, parents, scores


class _RequestIndex:
    """A running request's tree over its last tokens."""

    __slots__ = ("base", "first", "stream", "tree")

    def __init__(self, max_depth: int, base: int):
        self.tree = SuffixTree(max_depth)
        self.stream = Stream()  # the sequence's tokens from position `base` on
        self.base = base
        self.first = 0  # the oldest stream position whose substrings are held

    @property
    def indexed(self) -> int:
        """The sequence's tokens before this position are in the tree (or slid out of its window)."""
        return self.base + len(self.stream.tokens)


class SuffixDrafter:
    """The suffix-decoding proposer (see the module docstring). Drafts are trees (`Draft.parents`) with the
    proposer's acceptance estimate per node (`Draft.scores`), best first, at most ks[i] nodes."""

    drafts_are_free = True
    prior_acceptance = 0.3
    observes_target = 0

    def __init__(self, *, max_depth: int = 24, max_global_tokens: int = 200_000, spec_factor: float = 2.0,
                 min_token_prob: float = 0.1, max_request_tokens: int = 8192, prompt_context: int = 8):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        if max_global_tokens < 0:
            raise ValueError(f"max_global_tokens must be >= 0, got {max_global_tokens}")
        if spec_factor <= 0:
            raise ValueError(f"spec_factor must be > 0, got {spec_factor}")
        if not 0.0 <= min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        if max_request_tokens < max_depth:
            raise ValueError(f"max_request_tokens ({max_request_tokens}) must be >= max_depth ({max_depth})")
        if prompt_context < 0:
            raise ValueError(f"prompt_context must be >= 0, got {prompt_context}")
        self.max_depth = max_depth
        self.max_global_tokens = max_global_tokens
        self.spec_factor = spec_factor
        self.min_token_prob = min_token_prob
        self.max_request_tokens = max_request_tokens
        self.prompt_context = prompt_context
        self.requests: dict[str, _RequestIndex] = {}
        self.tenants: dict[bytes | None, SuffixTree] = {}
        # Finished requests' streams in the global trees, oldest first: id -> (tenant, tokens).
        self._stored: OrderedDict[int, tuple[bytes | None, list[int]]] = OrderedDict()
        self._next_id = 0
        self.global_tokens = 0
        self._max_pattern: dict[int, int] = {}

    @classmethod
    def from_config(cls, spec) -> SuffixDrafter:
        """From the suffix_* fields of a cluster.config.SpeculativeConfig."""
        return cls(max_depth=spec.suffix_max_depth, max_global_tokens=spec.suffix_max_global_tokens,
                   spec_factor=spec.suffix_spec_factor, min_token_prob=spec.suffix_min_token_prob)

    # ---- Proposer ----
    def propose(self, seqs: list, ks: list[int]) -> list[Draft | None]:
        drafts: list[Draft | None] = []
        for seq, k in zip(seqs, ks):
            if k <= 0 or not seq.token_ids:
                drafts.append(None)
                continue
            index = self._update(seq)
            max_len = self._max_pattern_len(k)
            best: tuple[list[int], list[int], list[float]] | None = None
            best_sum = 0.0
            context = seq.token_ids
            candidates = [(index.tree, *self._request_match(index, max_len))]
            tenant = self.tenants.get(seq.hash_root)
            if tenant is not None:
                candidates.append((tenant, *tenant.match(context, max_len)))
            for tree, position, length in candidates:
                if position is None:
                    continue
                budget = min(k, math.ceil(self.spec_factor * length))
                tokens, parents, scores = tree.expand(position, length, budget, self.min_token_prob)
                total = sum(scores)
                if tokens and total > best_sum:
                    best, best_sum = (tokens, parents, scores), total
            drafts.append(Draft(best[0], parents=best[1], scores=best[2]) if best is not None else None)
        return drafts

    def observe(self, seq, input_tokens: list[int], guesses) -> None:
        """Not used (observes_target is 0): the trees learn from committed tokens only."""

    def release(self, seq) -> None:
        """Drop the request's tree; the output of a request that finished (stop or length: not aborted, whose
        output may be cut anywhere) joins its tenant's global tree."""
        self.requests.pop(seq.seq_id, None)
        if seq.finish_reason in (None, "abort") or self.max_global_tokens == 0:
            return
        n = len(seq.token_ids)
        if n <= seq.num_prompt_tokens:
            return  # no output
        start = max(seq.num_prompt_tokens - self.prompt_context, n - self.max_global_tokens, 0)
        tokens = seq.token_ids[start:]
        tenant = self.tenants.get(seq.hash_root)
        if tenant is None:
            tenant = self.tenants[seq.hash_root] = SuffixTree(self.max_depth)
        self._stored[self._next_id] = (seq.hash_root, tenant.add(tokens).tokens)
        self._next_id += 1
        self.global_tokens += len(tokens)
        while self.global_tokens > self.max_global_tokens:
            self._evict_oldest()

    # ---- inside ----
    def _evict_oldest(self) -> None:
        _, (key, tokens) = self._stored.popitem(last=False)
        tree = self.tenants[key]
        tree.remove(tokens)
        self.global_tokens -= len(tokens)
        if tree.num_tokens == 0:
            del self.tenants[key]

    @property
    def num_global_nodes(self) -> int:
        return sum(tree.num_nodes for tree in self.tenants.values())

    def _update(self, seq) -> _RequestIndex:
        """The request's tree, extended with the tokens appended since the last call. A token list that
        shrank or changed (the sequence came back with other tokens) is indexed again from scratch."""
        tokens = seq.token_ids
        n = len(tokens)
        index = self.requests.get(seq.seq_id)
        if index is not None:
            held = index.stream.tokens
            if n < index.indexed or (held and tokens[index.indexed - 1] != held[-1]):
                index = None
        if index is None:
            index = self.requests[seq.seq_id] = _RequestIndex(self.max_depth, max(n - self.max_request_tokens, 0))
        if index.indexed < n:
            index.tree.extend(index.stream, tokens[index.indexed:n])
            held = index.stream.tokens
            while len(held) - index.first > self.max_request_tokens:
                index.tree.remove_start(held, index.first)
                index.first += 1
        return index

    @staticmethod
    def _request_match(index: _RequestIndex, max_len: int) -> tuple[tuple[_Node, int] | None, int]:
        """The longest suffix of the request's own tokens that occurred before in it with a continuation: the
        stream's cursor holds the position of every suffix, so no walk is needed. A suffix inside a tail
        occurred only here (no continuation yet)."""
        stream, tree = index.stream, index.tree
        for length in range(min(max_len, len(stream.nodes)), 0, -1):
            node, off = stream.nodes[length - 1], stream.offs[length - 1]
            if off == 0 and node.src is None and tree.has_continuation(node, 0, length):
                return (node, 0), length
        return None, 0

    def _max_pattern_len(self, k: int) -> int:
        """The longest pattern worth matching when up to k nodes may be drafted: a match of length L earns
        ceil(spec_factor * L) nodes, and the trie holds only max_depth - L levels below it, so longer patterns
        than the one whose draft still fits would only cut the draft short."""
        cached = self._max_pattern.get(k)
        if cached is None:
            cached = 1
            for length in range(self.max_depth - 1, 0, -1):
                if length + min(k, math.ceil(self.spec_factor * length)) <= self.max_depth:
                    cached = length
                    break
            self._max_pattern[k] = cached
        return cached
