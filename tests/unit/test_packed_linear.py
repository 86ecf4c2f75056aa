"""Linear weights packed for oneDNN: greedy output stays token-identical to the plain model, every arch."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.engine.engine import LLMEngine
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.packed_linear import PackedLinear, pack_linear_weights
from test_engine import hf_greedy, prompts
from tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _linears(model) -> int:
    return sum(type(m) is nn.Linear for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral"])
def test_packed_engine_is_token_identical_to_hf_generate_float32(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch=arch, seed=2)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION).eval()
    linears = _linears(ours)
    assert pack_linear_weights(ours) == linears > 0
    assert _linears(ours) == 0 and sum(isinstance(m, PackedLinear) for m in ours.modules()) == linears
    ps = prompts(ref.config.vocab_size, [5, 23, 40, 9, 1], seed=4)
    engine = LLMEngine(ours, block_size=4, num_blocks=128, max_num_seqs=4, max_num_batched_tokens=24)
    out = engine.generate(ps, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for p, o in zip(ps, out):
        assert o == hf_greedy(ref, p, 12), f"prompt of {len(p)} tokens diverged"


def test_packed_logits_match_the_plain_model(tmp_path):
    path = make_tiny_model(tmp_path / "m", arch="llama", seed=3)
    ids = torch.tensor([prompts(256, [20], seed=5)[0]])
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.0)):
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        packed = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        if not pack_linear_weights(packed):
            assert dtype is torch.bfloat16  # float32 always packs; bfloat16 needs oneDNN's bf16 kernels here
            continue
        with torch.inference_mode():
            a, b = ref(ids).logits.float(), packed(ids).logits.float()
        # bfloat16: F.linear runs the same oneDNN kernel, only unpacked: bit-identical
        assert (a - b).abs().max().item() <= tolerance * a.abs().max().item()


def test_tied_embeddings_survive_and_empty_weights_are_left_alone(tmp_path):
    path = make_tiny_model(tmp_path / "m", arch="llama", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    embeddings = model.model.embed_tokens.weight.detach().clone()
    gate = model.model.layers[0].mlp.gate_proj
    gate.weight = nn.Parameter(gate.weight.new_empty(0), requires_grad=False)  # e.g. moved to expert actors
    before = _linears(model)
    assert pack_linear_weights(model) == before - 1
    assert type(model.model.layers[0].mlp.gate_proj) is nn.Linear  # the emptied one stays as it was
    assert isinstance(model.lm_head, PackedLinear)
    assert isinstance(model.model.embed_tokens.weight, nn.Parameter)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    x = torch.randn(2, embeddings.shape[1])
    torch.testing.assert_close(model.lm_head(x), x @ embeddings.T, rtol=1e-5, atol=1e-5)
