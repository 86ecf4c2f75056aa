"""A drafter is another process: its replies are checked before anything reaches the model. Token ids outside
the vocabulary, too many tokens, bad probabilities or a malformed reply are dropped (the sequence decodes without
a draft that round); greedy output stays token-identical."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from specserve.actors.draft.client import DrafterClient, InProcessDrafterLink, invalid_draft, invalid_tree
from specserve.actors.draft.draft_models import build_draft_model
from specserve.actors.draft.model_drafter import ModelDrafter
from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.engine.engine import LLMEngine
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.speculation import SpeculationController
from specserve.cluster.config import ModelConfig, SpeculativeConfig
from transformers import AutoModelForCausalLM
from tiny_models import make_tiny_model

VOCAB = 384


def test_invalid_draft_names_each_problem():
    ok = np.full((2, VOCAB), 1 / VOCAB, dtype=np.float16)
    assert invalid_draft([1, 383], None, 4, VOCAB) is None
    assert invalid_draft([1, 383], ok, 4, VOCAB) is None
    assert invalid_draft([np.int64(5)], None, 4, VOCAB) is None
    assert "outside the vocabulary [0, 384)" in invalid_draft([1, 384], None, 4, VOCAB)
    assert "outside the vocabulary" in invalid_draft([-1], None, 4, VOCAB)
    assert "outside the vocabulary" in invalid_draft([10 ** 12], None, 4, VOCAB)
    assert "outside the vocabulary" in invalid_draft([1.0], None, 4, VOCAB)
    assert "outside the vocabulary" in invalid_draft([True], None, 4, VOCAB)
    assert "at most k=2" in invalid_draft([1, 2, 3], None, 2, VOCAB)
    assert "at most k=2" in invalid_draft("ab", None, 2, VOCAB)
    assert "probs of shape (1, 384)" in invalid_draft([1, 2], ok[:1], 4, VOCAB)
    assert "probs of shape (384,)" in invalid_draft([1], ok[0], 4, VOCAB)
    bad = ok.copy()
    bad[0, 3] = np.nan
    assert "not finite" in invalid_draft([1, 2], bad, 4, VOCAB)
    bad[0, 3] = -0.5
    assert "non-negative" in invalid_draft([1, 2], bad, 4, VOCAB)


def test_invalid_tree_names_each_problem():
    assert invalid_tree(None, None, 3) is None
    assert invalid_tree([-1, 0, 0], [0.9, 0.5, 0.2], 3) is None
    assert "list of 3" in invalid_tree([-1, 0], None, 3)
    assert "not an earlier token" in invalid_tree([-1, 1, 0], None, 3)
    assert "not an earlier token" in invalid_tree([-1, True, 0], None, 3)
    assert "not an earlier token" in invalid_tree([-2, 0, 0], None, 3)
    assert "scores must be a list of 3" in invalid_tree(None, [0.5], 3)
    assert "in [0, 1]" in invalid_tree(None, [0.5, float("nan"), 0.1], 3)


class HostileLink(InProcessDrafterLink):
    """A real draft model whose replies are then corrupted, in turn, in every way the client must catch."""

    CORRUPTIONS = [
        lambda r: replace(r, tokens=[VOCAB + 5] + list(r.tokens[1:])),
        lambda r: replace(r, tokens=[-3] + list(r.tokens[1:])),
        lambda r: replace(r, tokens=list(r.tokens) * 10),
        lambda r: vars(r),  # not a DraftReply at all
        lambda r: replace(r, parents=[0] * len(r.tokens)),  # a "tree" whose first node is its own parent
        lambda r: replace(r, parents=[-1] * len(r.tokens)),  # a tree with draft distributions (sampled)
        lambda r: replace(r, scores=[2.0] * len(r.tokens)),
        lambda r: r,  # some replies pass untouched: speculation still runs
    ]

    def __init__(self, drafter):
        super().__init__(drafter)
        self.n = 0

    def submit(self, client, requests, releases):
        replies = super().submit(client, requests, releases)
        out = []
        for r in replies:
            if r.tokens:
                r = self.CORRUPTIONS[self.n % len(self.CORRUPTIONS)](r)
                self.n += 1
            out.append(r)
        return out


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("target"), arch="llama", seed=1, num_layers=4)


def test_hostile_drafter_replies_are_dropped_and_greedy_output_is_unchanged(target_dir):
    def engine(proposer):
        model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32,
                                                     attn_implementation=ATTN_IMPLEMENTATION).eval()
        return LLMEngine(model, block_size=4, num_blocks=300, max_num_seqs=8, max_num_batched_tokens=64,
                         proposer=proposer,
                         controller=SpeculationController(4, adaptive=False) if proposer else None)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 9)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = engine(None).generate(prompts, params)

    spec = SpeculativeConfig(method="layer_skip", layer_skip_fraction=0.5)
    loaded = build_draft_model("layer_skip", ModelConfig(source=str(target_dir), dtype="float32", device="cpu"),
                               spec)
    client = DrafterClient(VOCAB, sampled_drafts=False, timeout_s=SpeculativeConfig().timeout_s)
    link = HostileLink(ModelDrafter(loaded.model, block_size=4, max_model_len=0, num_blocks=300))
    client.attach_worker("hostile", link)
    eng = engine(client)
    assert eng.generate(prompts, params) == expected
    assert client.stats["invalid"] >= 7 and link.n >= 8
    assert eng.spec_stats.rounds > 0  # the untouched replies were still used
    eng.block_manager.check_invariants()


class UnansweringLink:
    """A drafter worker whose reply never comes: it misses the deadline (as ray.get raises), or it is gone."""

    def __init__(self, error: Exception):
        self.error = error
        self.submitted = 0

    def submit(self, client, requests, releases):
        self.submitted += 1

    def collect(self, pending, timeout):
        raise self.error


def test_a_late_worker_is_rested_and_a_failed_one_dropped():
    from ray.exceptions import GetTimeoutError

    from specserve.actors.engine.sequence import Sequence

    late, gone = UnansweringLink(GetTimeoutError("no reply in time")), UnansweringLink(RuntimeError("actor died"))
    client = DrafterClient(VOCAB, sampled_drafts=False, timeout_s=SpeculativeConfig().timeout_s, rest_s=3600)
    client.attach_worker("late", late)
    client.attach_worker("gone", gone)
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(temperature=0)) for i in range(2)]  # one per worker
    assert client.propose(seqs, [2, 2]) == [None, None]
    assert (client.stats["timeouts"], client.stats["failures"]) == (1, 1)
    assert client.workers() == ["late"]  # still attached, but resting: the next step sends it nothing
    assert client.propose(seqs, [2, 2]) == [None, None] and late.submitted == 1
