"""Suffix decoding without a model: the suffix trie (counts, removal, match, best-first expansion) and the
proposer around it (per-request and per-tenant global trees, eviction, rebuild)."""

import itertools
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from specserve.actors.draft.suffix import Stream, SuffixDrafter, SuffixTree


@dataclass
class FakeSeq:
    seq_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    hash_root: bytes | None = None
    finish_reason: str | None = None


def substring_counts(streams: list[list[int]], depth: int) -> Counter:
    """Brute force: occurrences of every substring of length <= depth."""
    counts: Counter = Counter()
    for s in streams:
        for i in range(len(s)):
            for n in range(1, depth + 1):
                if i + n <= len(s):
                    counts[tuple(s[i:i + n])] += 1
    return counts


def assert_totals(node) -> int:
    """Every ordinary node's `total` is the sum of its children's counts; returns the nodes seen."""
    if node.src is not None:
        return 1
    children = list(node.items())
    assert node.total == sum(c.count for _, c in children)
    return 1 + sum(assert_totals(c) for _, c in children)


def assert_counts(tree: SuffixTree, streams: list[list[int]], vocab: int) -> None:
    assert assert_totals(tree.root) == tree.num_nodes
    expected = substring_counts(streams, tree.max_depth)
    for path, n in expected.items():
        assert tree.occurrences(path) == n, path
    for path in list(expected)[:200]:  # and paths that never occurred
        assert tree.occurrences([*path[:-1], vocab]) == 0
    assert tree.num_tokens == sum(len(s) for s in streams)


def check_tree(draft_tokens, parents, scores):
    """The shape every draft tree must have: parents before children, distinct sibling tokens, best first."""
    assert len(draft_tokens) == len(parents) == len(scores)
    siblings = set()
    for i, p in enumerate(parents):
        assert -1 <= p < i
        assert (p, draft_tokens[i]) not in siblings
        siblings.add((p, draft_tokens[i]))
        assert 0.0 < scores[i] <= 1.0
        if p >= 0:
            assert scores[i] <= scores[p]
    assert all(a >= b for a, b in itertools.pairwise(scores))


def first_branch(draft) -> list[int]:
    """The path from the root through each node's first child."""
    path, node = [draft.tokens[0]], 0
    for i in range(1, len(draft.tokens)):
        if draft.parents[i] == node:
            path.append(draft.tokens[i])
            node = i
    return path


# ---- the trie ----
def test_appends_count_every_substring_up_to_the_depth():
    tree = SuffixTree(max_depth=3)
    stream = Stream()
    tree.extend(stream, [1, 2])
    tree.extend(stream, [1, 2, 3])  # incremental: the same as one call over [1, 2, 1, 2, 3]
    assert tree.num_tokens == 5
    assert tree.occurrences([1]) == 2
    assert tree.occurrences([1, 2]) == 2
    assert tree.occurrences([2, 1]) == 1
    assert tree.occurrences([1, 2, 1]) == 1
    assert tree.occurrences([1, 2, 3]) == 1
    assert tree.occurrences([2, 3, 1]) == 0
    with pytest.raises(ValueError, match="max_depth"):
        tree.occurrences([2, 1, 2, 3])  # deeper than max_depth: not held


@pytest.mark.parametrize("vocab", [2, 5, 40])
@pytest.mark.parametrize("depth", [2, 4, 7])
def test_counts_match_brute_force_over_incremental_streams(vocab, depth):
    """Repeats, overlaps ("a a a a") and branching at every depth, appended in chunks of any size."""
    rng = random.Random(vocab * 100 + depth)
    tree = SuffixTree(max_depth=depth)
    streams = []
    for _ in range(6):
        stream, tokens = Stream(), [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        i = 0
        while i < len(tokens):
            n = rng.randrange(1, 5)
            tree.extend(stream, tokens[i:i + n])
            i += n
        assert stream.tokens == tokens
        streams.append(tokens)
        assert_counts(tree, streams, vocab)
        if len(streams) > 3:  # and take some back, so that later streams meet nodes that lost occurrences
            tree.remove(streams.pop(rng.randrange(len(streams))))
            assert_counts(tree, streams, vocab)
    assert tree.num_nodes <= depth * tree.num_tokens + 1


@pytest.mark.parametrize("vocab", [2, 5])
def test_a_sliding_window_holds_the_substrings_of_the_window(vocab):
    rng = random.Random(vocab)
    depth, window = 5, 12
    tree, stream, first = SuffixTree(max_depth=depth), Stream(), 0
    for _ in range(80):
        tree.extend(stream, [rng.randrange(vocab)])
        while len(stream.tokens) - first > window:
            tree.remove_start(stream.tokens, first)
            first += 1
        assert_counts(tree, [stream.tokens[first:]], vocab)


def test_a_stream_that_does_not_repeat_costs_about_one_node_per_token():
    """Substrings that occur once are read from the stream (a tail), not built depth by depth."""
    tree = SuffixTree(max_depth=24)
    tokens = random.Random(3).sample(range(100_000), 2000)
    tree.add(tokens)
    assert tree.num_nodes == 2000 + 1
    tree.add(tokens[500:600])  # a repeat of 100 tokens: its substrings gain a second occurrence
    assert tree.occurrences(tokens[510:534]) == 2
    assert tree.num_nodes <= 2000 + 1 + 24 * 100


def test_removing_every_stream_restores_the_bare_root():
    tree = SuffixTree(max_depth=4)
    rng = random.Random(0)
    streams = [[rng.randrange(5) for _ in range(rng.randrange(1, 40))] for _ in range(20)]
    stored = [tree.add(s).tokens for s in streams]
    assert stored == streams
    assert tree.num_nodes > 1
    order = list(range(20))
    rng.shuffle(order)
    for i in order[:10]:
        tree.remove(streams[i])
    assert_counts(tree, [streams[i] for i in order[10:]], vocab=5)  # as if never held
    for i in order[10:]:
        tree.remove(streams[i])
    assert tree.num_nodes == 1
    assert tree.num_tokens == 0
    assert tree.root.child is None


def test_removing_a_stream_the_tree_does_not_hold_is_an_error():
    tree = SuffixTree(max_depth=3)
    tree.add([1, 2, 3])
    with pytest.raises(ValueError, match="not in the tree"):
        tree.remove([4, 5])


def continuations(tree: SuffixTree, context: list[int], max_len: int) -> tuple[list[int], int]:
    """The next tokens after the matched suffix (all branches, one level) and the match length."""
    position, length = tree.match(context, max_len)
    if position is None:
        return [], 0
    tokens, parents, _ = tree.expand(position, length, budget=100, min_prob=0.0)
    return sorted(t for t, p in zip(tokens, parents) if p == -1), length


def test_match_picks_the_longest_suffix_with_continuations():
    tree = SuffixTree(max_depth=8)
    tree.add([5, 1, 2, 3, 9, 7, 2, 3, 4])
    assert continuations(tree, [8, 7, 2, 3], max_len=7) == ([4], 3)  # "7 2 3" -> 4 beats "2 3" -> {9, 4}
    assert continuations(tree, [8, 1, 2, 3], max_len=7) == ([9], 3)
    assert continuations(tree, [8, 1, 2, 3], max_len=2) == ([4, 9], 2)  # capped pattern length
    assert tree.match([3, 4], max_len=7) == (None, 0)  # "4" occurs, but nothing followed it
    assert tree.match([6], max_len=7) == (None, 0)
    assert tree.match([], max_len=7) == (None, 0)
    # the depth bound: "1 2 3 9 7 2 3" (7 tokens) is held with a continuation only up to depth 8
    assert continuations(tree, [1, 2, 3, 9, 7, 2, 3], max_len=7) == ([4], 7)
    position, length = tree.match([1, 2, 3, 9, 7, 2, 3], max_len=7)
    assert tree.expand(position, length, budget=5, min_prob=0.0)[0] == [4]  # nothing held below depth 8


def test_expand_is_best_first_within_budget_and_min_prob():
    tree = SuffixTree(max_depth=6)
    # after 0: 1 x6, 2 x3, 3 x1; after 0 1: 4 x4, 5 x2
    for follow in [[1, 4]] * 4 + [[1, 5]] * 2 + [[2, 6]] * 3 + [[3, 7]]:
        tree.add([0, *follow])
    position, length = tree.match([0], max_len=5)
    tokens, parents, scores = tree.expand(position, length, budget=10, min_prob=0.0)
    check_tree(tokens, parents, scores)
    assert tokens[:4] == [1, 4, 2, 6] and parents[:4] == [-1, 0, -1, 2]
    assert scores[:4] == pytest.approx([0.6, 0.4, 0.3, 0.3])
    assert sorted(tokens) == [1, 2, 3, 4, 5, 6, 7]
    assert tree.expand(position, length, budget=3, min_prob=0.0)[0] == [1, 4, 2]
    tokens, _, scores = tree.expand(position, length, budget=10, min_prob=0.2)  # branch 3 (0.1) dropped
    assert sorted(tokens) == [1, 2, 4, 5, 6]
    assert min(scores) == pytest.approx(0.6 * 2 / 6)  # a branch of 1/3, kept: the threshold is per branch


# ---- the proposer ----
def test_a_repeated_passage_is_proposed_with_certain_branches():
    rng = random.Random(1)
    passage = [rng.randrange(1000, 2000) for _ in range(40)]
    seq = FakeSeq("r", [7, 8, *passage, 3, *passage[:10]], num_prompt_tokens=5)
    drafter = SuffixDrafter(max_depth=24)
    (draft,) = drafter.propose([seq], [8])
    assert draft.tokens == passage[10:18]
    assert draft.parents == [-1, 0, 1, 2, 3, 4, 5, 6]
    assert draft.scores == pytest.approx([1.0] * 8)
    # the request grows (incremental update) and the draft follows it
    seq.token_ids += passage[10:14]
    (draft,) = drafter.propose([seq], [4])
    assert draft.tokens == passage[14:18]
    assert drafter.propose([seq], [0]) == [None]


def test_budget_grows_with_the_matched_pattern():
    passage = list(range(100, 140))
    drafter = SuffixDrafter(max_depth=24, spec_factor=1.0)
    short = FakeSeq("a", [*passage, 1, *passage[:2]], num_prompt_tokens=1)
    (draft,) = drafter.propose([short], [16])
    assert len(draft.tokens) == 2  # matched 2 tokens: earns ceil(1.0 * 2) nodes
    longer = FakeSeq("b", [*passage, 1, *passage[:12]], num_prompt_tokens=1)
    (draft,) = drafter.propose([longer], [16])
    assert draft.tokens == passage[12:24]


def finished(seq_id, prompt, output, tenant=None):
    return FakeSeq(seq_id, [*prompt, *output], len(prompt), hash_root=tenant, finish_reason="stop")


def test_two_continuations_seen_three_to_one_give_two_weighted_branches():
    drafter = SuffixDrafter(max_depth=8, prompt_context=1)
    for i, last in enumerate([4, 4, 5, 4]):
        drafter.release(finished(f"f{i}", [7], [1, 2, 3, last]))
    (draft,) = drafter.propose([FakeSeq("new", [9, 9, 1, 2, 3], 5)], [8])
    assert draft.tokens == [4, 5]
    assert draft.parents == [-1, -1]
    assert draft.scores == pytest.approx([0.75, 0.25])
    # with min_token_prob above 1/4 only the likelier branch is proposed
    strict = SuffixDrafter(max_depth=8, prompt_context=1, min_token_prob=0.3)
    for i, last in enumerate([4, 4, 5, 4]):
        strict.release(finished(f"f{i}", [7], [1, 2, 3, last]))
    (draft,) = strict.propose([FakeSeq("new", [9, 9, 1, 2, 3], 5)], [8])
    assert draft.tokens == [4]


def test_the_candidate_with_the_larger_score_sum_wins():
    drafter = SuffixDrafter(max_depth=12, prompt_context=0)
    drafter.release(finished("old", [0], [1, 2, 3, 10, 11, 12, 13]))
    # the request's own history continues "1 2 3" two ways (score sum 1.0 at best); the global tree one way,
    # certain for 3 levels
    seq = FakeSeq("r", [1, 2, 3, 20, 1, 2, 3, 21, 1, 2, 3], 11)
    (draft,) = drafter.propose([seq], [3])
    assert draft.tokens == [10, 11, 12]


def test_tenants_never_see_each_others_outputs():
    drafter = SuffixDrafter(max_depth=8, prompt_context=0)
    drafter.release(finished("a1", [1], [50, 51, 52, 53, 54], tenant=b"A"))
    probe = [60, 50, 51, 52]
    (for_a,) = drafter.propose([FakeSeq("a2", probe, 4, hash_root=b"A")], [4])
    assert for_a.tokens == [53, 54]
    (for_b,) = drafter.propose([FakeSeq("b1", probe, 4, hash_root=b"B")], [4])
    (for_default,) = drafter.propose([FakeSeq("n1", probe, 4)], [4])
    assert for_b is None and for_default is None


def test_an_unfinished_release_only_drops_the_request_tree():
    drafter = SuffixDrafter(max_depth=8)
    seq = FakeSeq("r", [1, 2, 3, 1, 2], 3)
    drafter.propose([seq], [4])
    assert "r" in drafter.requests
    drafter.release(seq)  # no finish_reason: not an output worth keeping
    assert "r" not in drafter.requests and drafter.global_tokens == 0 and not drafter.tenants
    aborted = FakeSeq("a", [1, 2, 3, 1, 2], 3, finish_reason="abort")  # cut anywhere by the client
    drafter.release(aborted)
    assert drafter.global_tokens == 0 and not drafter.tenants


def test_the_drafter_worker_bounds_the_tokens_it_mirrors():
    from specserve.actors.draft.protocol import DraftRelease, DraftRequest
    from specserve.actors.draft.suffix_worker import SuffixDraftWorker

    worker = SuffixDraftWorker(SuffixDrafter(max_depth=8), max_mirrored_tokens=100)
    for i in range(5):
        (reply,) = worker.draft_batch("c", [DraftRequest(f"s{i}", 1, 0, [1, 2, 3] * 10, 4, None, 10)])
        assert reply.base == 30 and not reply.resync
    assert worker.mirrored_tokens <= 100 and len(worker.states) == 3  # the two least recent dropped
    assert worker.stats["evictions"] == 2
    (stale,) = worker.draft_batch("c", [DraftRequest("s0", 1, 30, [4], 4)])
    assert stale.resync  # dropped: its verifier sends everything again
    worker.draft_batch("c", [], [DraftRelease("s4", [7, 8], "stop"), DraftRelease("s3", [], "abort")])
    assert worker.drafter.global_tokens > 0 and worker.mirrored_tokens == 30  # s4's output kept, s3's not


def test_a_changed_token_list_is_indexed_again():
    drafter = SuffixDrafter(max_depth=8)
    seq = FakeSeq("r", [1, 2, 3, 4, 1, 2], 2)
    assert drafter.propose([seq], [2])[0].tokens == [3, 4]
    # the sequence came back (preempted, recomputed) with a shorter, different history
    seq.token_ids = [5, 6, 7, 5, 6]
    assert drafter.propose([seq], [2])[0].tokens == [7, 5]
    # same length, other last token
    seq.token_ids = [5, 6, 7, 5, 9]
    assert drafter.propose([seq], [2]) == [None]
    fresh = SuffixTree(8)
    fresh.add(seq.token_ids)
    assert drafter.requests["r"].tree.num_nodes == fresh.num_nodes
    # released and back under the same id: starts from scratch too
    drafter.release(seq)
    seq.token_ids = [1, 2, 3, 1, 2]
    assert drafter.propose([seq], [1])[0].tokens == [3]


def test_the_request_tree_holds_only_its_last_tokens():
    drafter = SuffixDrafter(max_depth=4, max_request_tokens=10)
    seq = FakeSeq("r", [1, 2, 3], 1)
    drafter.propose([seq], [2])
    for t in range(100, 130):
        seq.token_ids.append(t)
        drafter.propose([seq], [2])
    index = drafter.requests["r"]
    assert index.tree.num_tokens == 10
    window = SuffixTree(4)
    window.add(seq.token_ids[-10:])
    assert index.tree.num_nodes == window.num_nodes
    seq.token_ids += [1, 2]  # "1 2 3" left the window: no longer proposed
    assert drafter.propose([seq], [2]) == [None]


def test_soak_stays_within_the_token_cap_and_a_node_bound():
    rng = random.Random(7)
    depth, cap = 6, 3000
    drafter = SuffixDrafter(max_depth=depth, max_global_tokens=cap, max_request_tokens=200, prompt_context=4)
    phrases = [[rng.randrange(50) for _ in range(rng.randrange(3, 12))] for _ in range(30)]
    running: list[FakeSeq] = []
    proposed = 0
    for step in range(6000):
        if len(running) < 8:
            tenant = rng.choice([b"A", b"B", b"C", None])
            prompt = [t for _ in range(rng.randrange(1, 4)) for t in rng.choice(phrases)]
            running.append(FakeSeq(f"s{step}", prompt, len(prompt), hash_root=tenant))
        seqs = list(running)
        drafts = drafter.propose(seqs, [rng.randrange(0, 6) for _ in seqs])
        for seq, draft in zip(seqs, drafts):
            if draft is not None:
                check_tree(draft.tokens, draft.parents, draft.scores)
                proposed += 1
            # commit a prefix of the draft's best branch (what a verifier accepting it would), then a token
            accepted = first_branch(draft)[:rng.randrange(0, 3)] if draft is not None else []
            seq.token_ids += [*accepted, rng.choice(rng.choice(phrases))]
            if rng.random() < 0.03 or len(seq.token_ids) > 300:
                seq.finish_reason = "stop"
                running.remove(seq)
                drafter.release(seq)
        assert drafter.global_tokens <= cap
        assert sum(t.num_tokens for t in drafter.tenants.values()) == drafter.global_tokens
        # a stream of n tokens adds at most depth nodes per token, plus each tree's root
        assert drafter.num_global_nodes <= depth * drafter.global_tokens + len(drafter.tenants)
        for index in drafter.requests.values():
            assert index.tree.num_tokens <= 200
            assert index.tree.num_nodes <= depth * 200 + 1
    assert proposed > 1000
    assert len(drafter.requests) == len(running)
    # the trees hold exactly what they should: each tenant its stored outputs, each request its last tokens
    for key, tree in drafter.tenants.items():
        assert_counts(tree, [tokens for k, tokens in drafter._stored.values() if k == key], vocab=50)
    for seq in running:  # indexed up to its last proposal
        index = drafter.requests[seq.seq_id]
        held = index.stream.tokens
        assert seq.token_ids[index.base:index.base + len(held)] == held
        assert_counts(index.tree, [held[index.first:]], vocab=50)
        assert len(held) - index.first == min(200, len(held))
    for seq in running:
        drafter.release(seq)
    assert not drafter.requests
    while drafter._stored:  # everything evicted: the trees are gone
        drafter._evict_oldest()
    assert not drafter.tenants and drafter.global_tokens == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_depth"):
        SuffixDrafter(max_depth=1)
    with pytest.raises(ValueError, match="spec_factor"):
        SuffixDrafter(spec_factor=0)
    with pytest.raises(ValueError, match="min_token_prob"):
        SuffixDrafter(min_token_prob=1.5)
    with pytest.raises(ValueError, match="max_request_tokens"):
        SuffixDrafter(max_depth=24, max_request_tokens=10)
    with pytest.raises(ValueError, match="max_global_tokens"):
        SuffixDrafter(max_global_tokens=-1)
