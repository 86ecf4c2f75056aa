"""DecoderForward and its fused ops (actors/engine/decoder_forward.py, layer_ops.cpp) against the model's own
modules: the same bits, in float32 and bfloat16. The engine's greedy tests against Hugging Face generate
(test_engine, test_spec_engine, test_draft_trees) also run through this path."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from specserve.actors.engine import cpu_kernels
from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.engine.decoder_forward import DecoderForward
from specserve.actors.engine.engine import LLMEngine
from specserve.actors.engine.sampling_params import SamplingParams
from tiny_models import ARCHS, make_tiny_model

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [16, 64, 100, 576, 4099])
def test_rms_norm_is_the_eager_norm_to_the_bit(dtype, width):
    g = torch.Generator().manual_seed(width)
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    norm.weight.data = (torch.rand(width, generator=g) * 2).to(dtype)
    x = (torch.randn(33, width, generator=g) * 3).to(dtype)
    residual = (torch.randn(33, width, generator=g) * 5).to(dtype)

    out = torch.empty_like(x)
    cpu_kernels.rms_norm(x, norm.weight.data, 1e-5, out)
    assert torch.equal(out, norm(x))

    summed = residual.clone()
    cpu_kernels.rms_norm(x, norm.weight.data, 1e-5, out, summed)
    assert torch.equal(summed, residual + x)  # the layer's residual connection, kept for the next one
    assert torch.equal(out, norm(residual + x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (9, 3, 64), (8, 8, 128)])
def test_rope_store_is_the_eager_rotary_embedding_to_the_bit(dtype, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(dim)
    rows, num_slots = 11, 64
    q = torch.randn(rows, heads * dim, generator=g).to(dtype)
    k = torch.randn(rows, kv_heads * dim, generator=g).to(dtype)
    v = torch.randn(rows, kv_heads * dim, generator=g).to(dtype)
    angles = torch.rand(rows, dim // 2, generator=g) * 300
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    slots = torch.randperm(num_slots, generator=g)[:rows]
    k_cache = torch.zeros(num_slots, kv_heads, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)

    q_eager, k_eager = apply_rotary_pos_emb(q.view(1, rows, heads, dim).transpose(1, 2),
                                            k.view(1, rows, kv_heads, dim).transpose(1, 2), cos[None], sin[None])
    rotated = q.clone()
    cpu_kernels.rope_store(rotated, k, v, cos, sin, slots, k_cache, v_cache)

    assert torch.equal(rotated.view(rows, heads, dim), q_eager[0].transpose(0, 1))
    assert torch.equal(k_cache[slots], k_eager[0].transpose(0, 1))
    assert torch.equal(v_cache[slots], v.view(rows, kv_heads, dim))
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


def test_the_kernels_run_without_the_gil():
    """Another Python thread (the replica's event loop) runs while a kernel computes, as it does during torch's
    own ops. With the GIL held, no other thread could run between the call's start and its return."""
    import threading
    import time

    x = torch.randn(16384, 4096)  # one RMSNorm call on one thread: about 75 ms on the 2-core development machine
    weight = torch.ones(4096)
    cpu_kernels.rms_norm(x[:8], weight, 1e-6, x[:8])  # built and warm
    ticks: list[float] = []
    span: list[float] = []
    done = threading.Event()

    def call():
        torch.set_num_threads(1)  # this thread's count: the call's length does not shrink with the cores
        span.append(time.perf_counter())
        cpu_kernels.rms_norm(x, weight, 1e-6, x)
        span.append(time.perf_counter())
        done.set()

    threads = torch.get_num_threads()
    try:
        worker = threading.Thread(target=call)
        worker.start()
        while not done.is_set():
            ticks.append(time.perf_counter())
        worker.join()
    finally:
        torch.set_num_threads(threads)
    start, end = span
    # Leave out the end: once the call returns, the worker may yield the GIL (a switch interval, 5 ms) before it
    # reads the clock.
    inside = [t for t in ticks if start < t < end - 0.010]
    assert end - start > 0.030 and len(inside) > 10, (end - start, len(inside))


def step_logits(model, fused: bool, prompts) -> list[torch.Tensor]:
    """Every engine step's logits, with the layers run as DecoderForward or as the model's own forward."""
    engine = LLMEngine(model, block_size=4, num_blocks=128, max_num_seqs=4, max_num_batched_tokens=20,
                       fused_layers=fused)
    seen, execute = [], engine.runner.execute

    def recording(batch):
        logits = execute(batch)
        seen.append(logits.clone())
        return logits

    engine.runner.execute = recording
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert (engine.runner.decoder is not None) == fused
    return seen


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_steps_logits_are_the_models_own_to_the_bit(tmp_path, arch, dtype):
    """Prefill chunks beside decodes (a 20-token step budget), prefix hits, grouped-query attention, Qwen3's
    query/key norms, mixture-of-experts MLPs through their own modules."""
    path = make_tiny_model(tmp_path, arch=arch, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 31, 12, 2)]
    prompts.append(prompts[1][:24] + [7, 8])  # shares 6 blocks with prompt 1
    fused, own = step_logits(model, True, prompts), step_logits(model, False, prompts)
    assert len(fused) == len(own) > 10
    for step, (a, b) in enumerate(zip(fused, own)):
        assert torch.equal(a, b), f"step {step}: logits differ by up to {(a - b).abs().max().item()}"


def test_a_replaced_mlp_forward_is_kept(tmp_path):
    """Expert dispatch installs its own forward on a dense MLP (actors/experts/hook.py): DecoderForward must call
    it rather than the MLP's own projections."""
    path = make_tiny_model(tmp_path, arch="llama", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION)
    model.eval()
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x, own=mlp.forward: own(x) * 0.5  # a different MLP than the weights say
    prompts = [[5, 9, 13, 21, 7], [40, 41, 42]]
    fused, own = step_logits(model, True, prompts), step_logits(model, False, prompts)
    assert all(torch.equal(a, b) for a, b in zip(fused, own))
    del mlp.forward
    assert not torch.equal(step_logits(model, True, prompts)[0], fused[0])  # the halving did change the output


def test_models_of_another_shape_run_their_own_forward(tmp_path):
    path = make_tiny_model(tmp_path, arch="llama", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.norm = nn.LayerNorm(model.config.hidden_size)
    decoder, why = DecoderForward.build(model)
    assert decoder is None and "final norm LayerNorm" in why

    olmoe = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "olmoe", arch="olmoe", seed=3))
    decoder, why = DecoderForward.build(olmoe)
    assert decoder is None and "OlmoeForCausalLM" in why

    half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    decoder, why = DecoderForward.build(half)
    assert decoder is None and "float16" in why
