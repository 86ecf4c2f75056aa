"""The engine against the plain Hugging Face forward: greedy output must be token-identical (float32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.actors.engine import cpu_kernels
from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.engine.engine import LLMEngine, RequestRejected
from specserve.actors.engine.sampling_params import SamplingParams
from tiny_models import make_tiny_model


def load_pair(tmp_path_factory, arch):
    path = make_tiny_model(tmp_path_factory.mktemp(arch), arch=arch, seed=1)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION).eval()
    return ref, ours


def prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt, n):
    """HF generate(do_sample=False) for n tokens; EOS is not special here (the engine runs with ignore_eos)."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,paged_kernel,fused_layers", [
    ("llama", None, True), ("qwen2", None, True), ("qwen3", None, True), ("mistral", None, True),
    ("mixtral", None, True), ("qwen2_moe", None, True), ("llama", False, True), ("llama", None, False)])
def test_greedy_matches_hf_generate_with_batching_chunking_and_prefix_hits(tmp_path_factory, arch, paged_kernel,
                                                                           fused_layers):
    """paged_kernel None: decodes attend through the compiled kernel where it builds (CPU); False: the SDPA path.
    fused_layers: the layers run as DecoderForward where the kernels build; False: the model's own forward."""
    ref, ours = load_pair(tmp_path_factory, arch)
    vocab = ref.config.vocab_size
    ps = prompts(vocab, [5, 17, 33, 8, 41, 1, 12, 60])
    ps.append(ps[4][:36] + [5, 6, 7])  # shares 9 blocks of 4 with prompt 4
    # Small step budget: long prompts are prefilled in chunks next to running decodes.
    engine = LLMEngine(ours, block_size=4, num_blocks=256, max_num_seqs=6, max_num_batched_tokens=24,
                       paged_kernel=paged_kernel, fused_layers=fused_layers)
    assert engine.runner.paged_kernel == (paged_kernel is None and cpu_kernels.available())
    out = engine.generate(ps, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert (engine.runner.decoder is not None) == (fused_layers and cpu_kernels.available())
    for p, o in zip(ps, out):
        assert o == hf_greedy(ref, p, 12), f"prompt of {len(p)} tokens diverged"
    assert engine.block_manager.prefix_hits > 0
    engine.block_manager.check_invariants()


def test_wide_steps_run_on_more_threads_and_keep_output_exact(tmp_path_factory):
    """A step of at least wide_step_tokens tokens (long prefill chunks) runs on wide_step_threads torch threads,
    the others on the process's count, and greedy output stays the plain model's."""
    ref, ours = load_pair(tmp_path_factory, "llama")
    ps = prompts(ref.config.vocab_size, [40, 9, 33, 20], seed=5)
    seen = []  # (tokens, torch threads) of each step's forward; the embedding runs in both forward paths
    hook = ours.model.embed_tokens.register_forward_hook(
        lambda _m, args, _out: seen.append((args[0].numel(), torch.get_num_threads())))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = LLMEngine(ours, block_size=4, num_blocks=128, max_num_seqs=4, max_num_batched_tokens=32,
                           wide_step_tokens=16, wide_step_threads=2)
        out = engine.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        assert torch.get_num_threads() == 1  # back to the process's count after each wide step
        assert not LLMEngine(ours, block_size=4, num_blocks=8, wide_step_tokens=16,
                             wide_step_threads=1).runner.wide_step_tokens  # no more threads than it has: off
    finally:
        torch.set_num_threads(threads)
        hook.remove()
    assert {t for n, t in seen if n >= 16} == {2} and {t for n, t in seen if n < 16} == {1}, seen
    for p, o in zip(ps, out):
        assert o == hf_greedy(ref, p, 10), f"prompt of {len(p)} tokens diverged"


def test_preemption_under_kv_pressure_keeps_output_exact(tmp_path_factory):
    ref, ours = load_pair(tmp_path_factory, "llama")
    ps = prompts(ref.config.vocab_size, [30, 25, 40, 35, 28], seed=3)
    engine = LLMEngine(ours, block_size=4, num_blocks=28, max_num_seqs=5, max_num_batched_tokens=64)
    out = engine.generate(ps, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert engine.stats.preemptions > 0
    for p, o in zip(ps, out):
        assert o == hf_greedy(ref, p, 20)
    assert engine.block_manager.num_free_blocks == 28


def test_stop_conditions_and_rejections(tmp_path_factory):
    ref, ours = load_pair(tmp_path_factory, "llama")
    engine = LLMEngine(ours, block_size=4, num_blocks=64, max_model_len=100, eos_token_ids=[2])
    p = prompts(ref.config.vocab_size, [10])[0]
    free_run = engine.generate([p], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    stop_tok = free_run[3]
    out = engine.generate([p], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert out == free_run[:free_run.index(stop_tok) + 1]
    with pytest.raises(RequestRejected, match="context window"):
        engine.add_request("long", [5] * 95, SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="KV cache capacity"):
        LLMEngine(ours, block_size=4, num_blocks=4).add_request("big", [5] * 20, SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request("empty", [], SamplingParams())


def test_abort_frees_blocks(tmp_path_factory):
    _, ours = load_pair(tmp_path_factory, "llama")
    engine = LLMEngine(ours, block_size=4, num_blocks=64)
    engine.add_request("a", list(range(3, 23)), SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < 64
    assert engine.abort_request("a")
    assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == 64


def test_seeded_sampling_is_reproducible_across_batch_composition(tmp_path_factory):
    _, ours = load_pair(tmp_path_factory, "llama")
    engine = LLMEngine(ours, block_size=4, num_blocks=128)
    p = list(range(3, 15))
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=42)
    alone = engine.generate([p], params)[0]
    others = prompts(ours.config.vocab_size, [7, 19, 3], seed=9)
    batched = engine.generate([others[0], p, others[1], others[2]],
                              [SamplingParams(max_tokens=16, temperature=0.8)] + [params] +
                              [SamplingParams(max_tokens=16, temperature=0.8)] * 2)[1]
    assert alone == batched
    assert alone != engine.generate([p], SamplingParams(max_tokens=16, temperature=1.0, seed=43))[0]


def test_exported_blocks_import_into_another_engine(tmp_path_factory):
    """Blocks one engine computed, handed to its KV sink, installed in a second engine: the second prefills only
    the remainder and its greedy output is token-identical."""
    ref, ours = load_pair(tmp_path_factory, "llama")
    _, ours2 = load_pair(tmp_path_factory, "llama")
    exported: dict[bytes, torch.Tensor] = {}
    a = LLMEngine(ours, block_size=4, num_blocks=64, kv_sink=lambda hs, kv, root: exported.update(zip(hs, kv)))
    b = LLMEngine(ours2, block_size=4, num_blocks=64)
    p = prompts(ref.config.vocab_size, [22], seed=5)[0]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = a.generate([p], params)[0]
    cached, missing = b.block_manager.missing_prefix(p)
    assert cached == 0 and len(missing) == 5  # 21 usable tokens: 5 full blocks
    assert all(h in exported for h in missing)
    assert b.import_blocks(missing, [exported[h] for h in missing]) == 5
    assert b.block_manager.missing_prefix(p) == (5, [])
    got = b.generate([p], params)[0]
    assert got == expected
    assert b.block_manager.prefix_hits == 20  # 5 full blocks imported, the last 2 tokens computed
    b.block_manager.check_invariants()


def test_only_committed_tokens_are_exported_under_speculation(tmp_path_factory):
    """With n-gram speculation (draft tokens written into the cache and rolled back), every exported block is a
    block of the final committed sequence and its KV equals a plain prefill of that sequence."""
    from specserve.actors.draft.ngram import NgramDrafter
    from specserve.actors.engine.block_hash import block_hashes

    ref, ours = load_pair(tmp_path_factory, "llama")
    exported: dict[bytes, torch.Tensor] = {}
    from specserve.actors.engine.speculation import SpeculationController

    spec = LLMEngine(ours, block_size=4, num_blocks=128, proposer=NgramDrafter(1, 3, recycle=True),
                     controller=SpeculationController(3, adaptive=False),
                     kv_sink=lambda hs, kv, root: exported.update(zip(hs, kv)))
    base = prompts(ref.config.vocab_size, [12], seed=3)[0]
    p = base * 3  # repetitive: the n-gram drafter proposes, and some drafts are rejected
    out = spec.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert spec.spec_stats.draft_tokens > spec.spec_stats.accepted_tokens > 0
    full = p + out
    committed = block_hashes(full, 4, parent=spec.block_manager.root)
    assert set(exported) <= set(committed) and len(exported) >= len(committed) - 1

    plain = LLMEngine(ours, block_size=4, num_blocks=128)
    plain.generate([full], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    for i, h in enumerate(committed):
        if h in exported:
            block = plain.block_manager.cached_block(h)
            assert torch.allclose(plain.runner.read_blocks([block])[0], exported[h], atol=1e-5), f"block {i}"


def test_context_window_is_capped_at_a_sliding_window():
    from transformers import MistralConfig, Qwen2Config

    from specserve.actors.engine.engine import context_window
    assert context_window(MistralConfig(max_position_embeddings=32768, sliding_window=4096)) == 4096
    assert context_window(MistralConfig(max_position_embeddings=32768, sliding_window=None)) == 32768
    assert context_window(Qwen2Config(max_position_embeddings=8192, sliding_window=1024,
                                      use_sliding_window=False)) == 8192
    assert context_window(MistralConfig(max_position_embeddings=32768, sliding_window=None), 2048) == 2048


def test_open_max_tokens_fills_the_smaller_of_window_and_pool(tmp_path_factory):
    _, ours = load_pair(tmp_path_factory, "llama")
    engine = LLMEngine(ours, block_size=4, num_blocks=10, max_model_len=100)  # pool: 40 tokens < window
    out = engine.generate([list(range(3, 13))], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert len(out) == 30
    with pytest.raises(RequestRejected, match="no room"):
        engine.add_request("full", [5] * 40, SamplingParams(max_tokens=None))
