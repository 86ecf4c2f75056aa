"""Draft trees verified in one forward: greedy output token-identical to HF generate for trees of every shape (the
accepted path anywhere in the tree, so its KV is moved into place), batched with chunked prefill and prefix-cache
hits; sampled tree verification keeping the target distribution; the tree helpers themselves."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.engine.engine import LLMEngine
from specserve.actors.engine.sampler import processed_logits
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.speculation import (
    Draft,
    SpeculationController,
    SpeculationStats,
    accept_tree,
    tree_ancestors,
    record_round,
    tree_depths,
)
from chi_square import chi_square_p_value
from tiny_models import make_tiny_model

BLOCK = 4
VOCAB = 384


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("target"), arch="llama", seed=3, num_layers=3)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=ATTN_IMPLEMENTATION).eval()


def prompt_set():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 19, 37, 9, 44, 13)]


@pytest.fixture(scope="module")
def reference(target_dir):
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = {}
    for p in prompt_set():
        o = model.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False, pad_token_id=0)
        out[tuple(p)] = o[0, len(p):].tolist()
    return out


class OracleTreeProposer:
    """Trees of a given width and depth around the true greedy continuation: at each level the true token sits
    at a random sibling position (or is missing, with probability `miss`), so accepted paths run through any
    branch, stop anywhere, and the best-first order puts them off the tree's first path."""

    drafts_are_free = True
    prior_acceptance = 0.5
    observes_target = 0

    def __init__(self, truth: dict[tuple, list[int]], width: int, depth: int, miss: float, seed: int = 0):
        self.truth, self.width, self.depth, self.miss = truth, width, depth, miss
        self.rng = random.Random(seed)
        self.proposed = 0
        self.largest = 0  # draft tokens in the largest tree proposed

    def propose(self, seqs, ks):
        drafts = []
        for seq, k in zip(seqs, ks):
            if k <= 0:
                drafts.append(None)
                continue
            prompt = tuple(seq.token_ids[:seq.num_prompt_tokens])
            future = self.truth[prompt][seq.num_output_tokens:]
            tokens, parents, scores = [], [], []
            frontier = [(-1, 1.0, 0)]  # (node, score, depth) in best-first order
            while frontier and len(tokens) < k:
                node, score, depth = frontier.pop(0)
                if depth >= self.depth:
                    continue
                true = future[depth] if depth < len(future) and self.rng.random() > self.miss else None
                wrong = [t for t in self.rng.sample(range(3, VOCAB), self.width + 1) if t != true][:self.width]
                if true is not None:
                    wrong[self.rng.randrange(self.width)] = true
                for t in wrong:
                    if len(tokens) >= k:
                        break
                    tokens.append(t)
                    parents.append(node)
                    scores.append(score / self.width)
                    if t == true or self.rng.random() < 0.3:  # the true path grows deeper, some wrong ones too
                        frontier.append((len(tokens) - 1, score / self.width, depth + 1))
            self.proposed += 1
            self.largest = max(self.largest, len(tokens))
            drafts.append(Draft(tokens, parents=parents, scores=scores))
        return drafts

    def observe(self, seq, input_tokens, guesses):
        pass

    def release(self, seq):
        pass


def make_engine(target_dir, proposer, *, k=12, adaptive=False, **kw):
    args = dict(block_size=BLOCK, num_blocks=400, max_num_seqs=8, max_num_batched_tokens=64)
    args.update(kw)
    return LLMEngine(load(target_dir), proposer=proposer,
                     controller=SpeculationController(k, adaptive=adaptive, prior_acceptance=0.6), **args)


@pytest.mark.parametrize("width,depth,miss,k,paged_kernel", [(1, 6, 0.2, 6, None), (2, 4, 0.2, 12, None),
                                                              (3, 3, 0.3, 16, None), (4, 2, 0.0, 8, None),
                                                              (2, 4, 0.2, 12, False), (10, 6, 0.2, 80, None)])
def test_greedy_tree_speculation_is_token_identical_to_hf_generate(target_dir, reference, width, depth, miss, k,
                                                                   paged_kernel):
    """paged_kernel None: the trees attend through the compiled kernel where it builds; False: the SDPA path.
    k=80: trees of more draft tokens than the kernel's bitmask holds, which go through the SDPA path."""
    proposer = OracleTreeProposer(reference, width, depth, miss, seed=width * 10 + depth)
    engine = make_engine(target_dir, proposer, k=k, paged_kernel=paged_kernel,
                         max_num_batched_tokens=64 if k <= 64 else 8 * (k + 1))
    prompts = prompt_set()
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    # Concurrent requests, chunked prefill (budget 64), then the same prompts again: prefix-cache hits.
    for _ in range(2):
        out = engine.generate(prompts, params)
        assert out == [reference[tuple(p)] for p in prompts]
    st = engine.spec_stats
    assert st.rounds > 0 and 0 < st.accepted_tokens < st.draft_tokens
    if k > 64:
        assert proposer.largest > 64
    if depth > 1:
        assert len(st.drafted_at) > 1  # acceptance by depth was recorded
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == 400


def test_logprobs_of_tree_verified_tokens_come_from_their_own_rows(target_dir, reference):
    """An accepted path off the tree's first branch: each token's logprobs are those of its own context."""
    proposer = OracleTreeProposer(reference, 3, 3, 0.2, seed=7)
    engine = make_engine(target_dir, proposer, k=12)
    prompts = prompt_set()[:3]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2)
    for p in prompts:
        engine.add_request(str(len(p)), p, params)
    got: dict[str, list] = {str(len(p)): [] for p in prompts}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.logprobs)
    assert engine.spec_stats.accepted_tokens > 0
    ref = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    for p in prompts:
        tokens = reference[tuple(p)]
        with torch.no_grad():
            lsm = ref(torch.tensor([p + tokens])).logits[0].float().log_softmax(-1)
        entries = got[str(len(p))]
        assert [e.token_id for e in entries] == tokens
        for i, e in enumerate(entries):
            row = lsm[len(p) + i - 1]
            assert abs(e.logprob - float(row[e.token_id])) < 1e-4, i
            assert [t for t, _ in e.top] == row.topk(2).indices.tolist(), i


def test_trees_cut_to_the_step_token_budget_stay_token_identical(target_dir, reference):
    """More draft tokens than the step's budget: the scheduler keeps each tree's first nodes that fit."""
    proposer = OracleTreeProposer(reference, 3, 4, 0.2, seed=2)
    engine = make_engine(target_dir, proposer, k=16, max_num_batched_tokens=24)
    prompts = prompt_set()
    out = engine.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert out == [reference[tuple(p)] for p in prompts]
    assert engine.spec_stats.accepted_tokens > 0
    engine.block_manager.check_invariants()


def test_adaptive_tree_size_stays_token_identical(target_dir, reference):
    proposer = OracleTreeProposer(reference, 3, 4, 0.2, seed=1)
    engine = make_engine(target_dir, proposer, k=16, adaptive=True)
    prompts = prompt_set()
    out = engine.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert out == [reference[tuple(p)] for p in prompts]
    assert engine.spec_stats.rounds > 0


class SupportTreeProposer:
    """After the first token t0, a fixed two-level tree over tokens the target can sample (after top-k): three
    first tokens, two children each, chosen per t0. Deterministic drafts, so verification is multi-path rejection
    sampling with one-hot drafts."""

    drafts_are_free = True
    prior_acceptance = 0.5
    observes_target = 0

    def __init__(self, trees: dict[int, tuple[list[int], list[int]]]):
        self.trees = trees  # t0 -> (tokens, parents)

    def propose(self, seqs, ks):
        drafts = []
        for seq, k in zip(seqs, ks):
            if seq.num_output_tokens != 1 or k <= 0:  # one round per request: the test counts its two tokens
                drafts.append(None)
                continue
            tokens, parents = self.trees[seq.token_ids[-1]]
            drafts.append(Draft(tokens[:k], parents=parents[:k]))
        return drafts

    def observe(self, seq, input_tokens, guesses):
        pass

    def release(self, seq):
        pass


def test_sampled_tree_speculation_keeps_the_target_distribution(target_dir):
    """The two tokens after the first, both from one verified tree, against the target's distribution given the
    first: chi-square over the (t0, t1, t2) cells top_k allows, expected counts from the observed t0 counts."""
    n, top_k = 2400, 4
    prompt = prompt_set()[1]
    ref = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    sp = SamplingParams(temperature=1.0, top_k=top_k)

    def dist(tokens):
        with torch.no_grad():
            return processed_logits(ref(torch.tensor([tokens])).logits[0, -1], sp).softmax(-1)

    def support(p):
        return torch.nonzero(p).flatten().tolist()

    rng = random.Random(4)
    p1, p2, trees = {}, {}, {}
    for t0 in support(dist(prompt)):
        p1[t0] = dist(prompt + [t0])
        first = rng.sample(support(p1[t0]), 3)
        tokens, parents = list(first), [-1] * 3
        for i, t1 in enumerate(first):
            p2[(t0, t1)] = dist(prompt + [t0, t1])
            for t2 in rng.sample(support(p2[(t0, t1)]), 2):
                tokens.append(t2)
                parents.append(i)
        trees[t0] = (tokens, parents)
    random.seed(99)  # the engine draws each unseeded request's generator seed from `random`
    engine = make_engine(target_dir, SupportTreeProposer(trees), k=9, max_num_seqs=64, max_num_batched_tokens=1024)
    out = engine.generate([prompt] * n, [SamplingParams(max_tokens=3, temperature=1.0, top_k=top_k, ignore_eos=True)
                                          for _ in range(n)])
    st = engine.spec_stats
    assert st.rounds == n and st.accepted_tokens > n // 2  # every request verified its tree, often accepting
    firsts = {t0: sum(1 for o in out if o[0] == t0) for t0 in p1}
    cells, expected = [], []
    for t0, p in p1.items():
        for t1 in support(p):
            q = p2.get((t0, t1))
            if q is None:
                q = p2[(t0, t1)] = dist(prompt + [t0, t1])
            for t2 in support(q):
                cells.append((t0, t1, t2))
                expected.append(firsts[t0] * float(p[t1] * q[t2]))
    counts = {c: 0 for c in cells}
    for o in out:
        counts[tuple(o)] += 1  # a KeyError here would be a token outside the target's support
    assert chi_square_p_value([counts[c] for c in cells], expected) > 0.01


def test_accept_tree_greedy_follows_the_argmax_through_any_branch():
    #            node: 0  1  2  3  4  5
    tokens, parents = [5, 6, 7, 8, 9, 4], [-1, -1, 0, 1, 1, 4]
    logits = torch.full((7, 16), -1.0)
    greedy = SamplingParams(temperature=0)
    # Row 0 (last committed) -> 6 (node 1), row 2 (node 1) -> 9 (node 4), row 5 (node 4) -> 4 (node 5),
    # row 6 (node 5, a leaf) -> 3: the bonus token.
    for row, t in [(0, 6), (2, 9), (5, 4), (6, 3), (1, 2), (3, 1), (4, 1)]:
        logits[row, t] = 1.0
    assert accept_tree(logits, tokens, parents, greedy, torch.Generator()) == ([6, 9, 4, 3], [1, 4, 5])
    logits[0] = -1.0
    logits[0, 11] = 1.0  # no child of the root matches: just the target's token
    assert accept_tree(logits, tokens, parents, greedy, torch.Generator()) == ([11], [])


def test_tree_helpers():
    parents = [-1, -1, 0, 1, 1, 4]
    assert tree_depths(parents) == [1, 1, 2, 2, 2, 3]
    anc = tree_ancestors(parents)
    assert anc[5].nonzero().flatten().tolist() == [1, 4, 5]
    assert anc[2].nonzero().flatten().tolist() == [0, 2]
    d = Draft([5, 6, 7, 8, 9, 4], parents=parents, scores=[0.6, 0.3, 0.5, 0.2, 0.1, 0.05])
    assert d.main_path().tokens == [5, 7] and d.main_path().parents is None
    assert d.truncated(3).parents == [-1, -1, 0] and d.truncated(3).scores == [0.6, 0.3, 0.5]
    with pytest.raises(ValueError, match="precede"):
        Draft([1, 2], parents=[1, -1])
    with pytest.raises(ValueError, match="one parent per token"):
        Draft([1, 2], parents=[-1])


def test_node_values_of_an_overachieving_sequence_never_exceed_what_one_branch_can_return():
    from types import SimpleNamespace

    from specserve.actors.engine.speculation import AcceptanceEstimate, _node_values

    est = AcceptanceEstimate(0.5)
    for _ in range(5):
        est.calibrate(1.0, 4)  # accepted far more than the scores predicted
    assert est.calibration > 2
    seq = SimpleNamespace(acceptance=est)
    draft = Draft([1, 2, 3, 4], parents=[-1, -1, 0, 0], scores=[0.5, 0.4, 0.3, 0.2])
    values = _node_values(seq, draft)
    assert values[0] + values[1] <= 1.0 and values[2] + values[3] <= values[0] + 1e-9
    assert _node_values(SimpleNamespace(acceptance=AcceptanceEstimate(0.5)), draft) == [0.5, 0.4, 0.3, 0.2]


def test_a_new_sequence_trusts_scores_as_far_as_the_method_earned():
    """Scores that claimed 4 tokens a round where 1 was accepted: a new sequence starts near 1/4, not at 1, and
    a proposer whose scores proved right keeps them."""
    from types import SimpleNamespace

    from specserve.actors.engine.speculation import _node_values

    draft = Draft([1, 2], parents=[-1, 0], scores=[0.9, 0.8])
    for predicted, accepted, expect in ((4.0, 1, 0.25), (2.0, 2, 1.0)):
        ctl = SpeculationController(16, prior_acceptance=0.5)
        fresh = _node_values(SimpleNamespace(acceptance=ctl.new_estimate()), draft)
        assert fresh == [0.9, 0.8]  # nothing observed yet: scores as given
        seq = SimpleNamespace(draft=draft, spec_stats=SpeculationStats(), acceptance=ctl.new_estimate(),
                              token_ids=[7])
        for _ in range(200):
            draft.scores[:] = [predicted / 2, predicted / 2]
            record_round(seq, 2, [0] * (accepted + 1), None, ctl, None)
        draft.scores[:] = [0.9, 0.8]
        values = _node_values(SimpleNamespace(acceptance=ctl.new_estimate()), draft)
        assert values == pytest.approx([min(0.9 * expect, 0.999), min(0.8 * expect, 0.999)], rel=0.1)


def test_controller_sizes_a_scored_tree_by_its_node_values():
    ctl = SpeculationController(16, prior_acceptance=0.5, verify_cost=(0.02, 0.001))
    likely = [0.9, 0.8, 0.7, 0.6, 0.05, 0.04, 0.03, 0.02]
    # The first four nodes pay for their verification; the long tail does not.
    assert ctl.choose([0.02], [8], [0], node_values=[likely]) == [4]
    # Without values the same sequence drafts by its (low) per-token acceptance.
    assert ctl.choose([0.02], [8], [0]) == [0]
