"""Expert dispatch without Ray: the per-expert row plan matches Hugging Face eager's, shards load only their own
experts from either checkpoint layout, and models whose experts run in shards (split across two) give logits
bit-identical to HF eager and the same 64-token greedy continuation, for every tiny MoE architecture."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

from specserve.actors.experts.checkpoint import load_experts
from specserve.actors.experts.dispatch import plan_dispatch
from specserve.actors.experts.expert_shard import ExpertShard
from specserve.actors.experts.hook import experts_modules, install_dispatch
from specserve.actors.experts.transport import LocalTransport
from tiny_models import MOE_ARCHS, make_tiny_model


def test_plan_matches_eager_row_order():
    g = torch.Generator().manual_seed(0)
    top_k = torch.randint(0, 6, (9, 3), generator=g)
    top_k[2, 1] = 6  # the routers' "no expert" index: skipped
    plan = plan_dispatch(top_k, 6)
    mask = torch.nn.functional.one_hot(top_k, 7).permute(2, 1, 0)
    expected = [e for e in range(6) if mask[e].any()]
    assert [p.expert for p in plan] == expected
    for p in plan:
        k_pos, tok = torch.where(mask[p.expert])
        assert torch.equal(p.token_idx, tok) and torch.equal(p.top_k_pos, k_pos)


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.set_experts_implementation("eager")
    return model.eval()


def _sharded(path, num_shards=2):
    """The model with its experts dispatched to `num_shards` shards (expert e of every layer on shard e % n),
    each loading only its experts from the checkpoint."""
    model = _load(path)
    layers = experts_modules(model)
    slots = {(layer, e) for layer, m in layers.items() for e in range(m.num_experts)}
    act = ACT2FN[model.config.hidden_act]
    placement = {s: s[1] % num_shards for s in slots}
    shards = [ExpertShard(load_experts(path, {s for s in slots if placement[s] == i}), act)
              for i in range(num_shards)]
    install_dispatch(model, LocalTransport(shards, placement))
    return model, shards


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_sharded_experts_are_bit_identical_to_eager(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch=arch, seed=11, num_layers=3)
    ref = _load(path)
    model, shards = _sharded(path)
    ids = torch.randint(3, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        prompt = ids[:1, :9]
        kw = dict(max_new_tokens=64, do_sample=False, min_new_tokens=64)
        assert torch.equal(model.generate(prompt, **kw), ref.generate(prompt, **kw))
    assert all(s.tokens for s in shards)  # both shards computed rows
    dense_first = arch == "deepseek_v3"  # first_k_dense_replace=1: layer 0 is a plain MLP
    assert sorted(experts_modules(ref)) == ([1, 2] if dense_first else [0, 1, 2])


def test_fused_checkpoint_layout_reads_only_the_slices_asked_for(tmp_path):
    path = make_tiny_model(tmp_path / "m", arch="qwen3_moe", seed=3, num_layers=2)
    ref = _load(path)
    fused = {k: v.contiguous() for k, v in ref.state_dict().items() if ".experts." in k}
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    save_file(fused, str(fused_dir / "model.safetensors"))
    got = load_experts(fused_dir, {(1, 5), (0, 2)})
    per_expert = load_experts(path, {(1, 5), (0, 2)})
    for layer, e in [(1, 5), (0, 2)]:
        m = experts_modules(ref)[layer]
        assert torch.equal(got[(layer, e)][0], m.gate_up_proj[e]) and torch.equal(got[(layer, e)][1], m.down_proj[e])
        assert all(torch.equal(a, b) for a, b in zip(got[(layer, e)], per_expert[(layer, e)]))
    with pytest.raises(KeyError, match="layer 3 expert 0"):
        load_experts(path, {(3, 0)})


def test_dense_mlp_in_ffn_shards_keeps_greedy_output(tmp_path):
    from specserve.actors.experts.checkpoint import load_ffn_shards
    from specserve.actors.experts.hook import install_ffn_dispatch, mlp_modules

    path = make_tiny_model(tmp_path / "llama", arch="llama", seed=12, num_layers=3)
    ref = _load(path)
    model = _load(path)
    layers = mlp_modules(model)
    act = ACT2FN[model.config.hidden_act]
    placement = {(layer, i): i for layer in layers for i in range(2)}
    shards = [ExpertShard(load_ffn_shards(path, {s for s, a in placement.items() if a == i}, 2), act)
              for i in range(2)]
    install_ffn_dispatch(model, LocalTransport(shards, placement), 2)
    ids = torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        # Two partial down-projections summed round differently from one matmul: close, not bit-identical.
        assert (model(ids).logits - ref(ids).logits).abs().max() <= 1e-5
        kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
        assert torch.equal(model.generate(ids[:1, :8], **kw), ref.generate(ids[:1, :8], **kw))


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_batching_changes_sharded_logits_by_at_most_1e5(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch=arch, seed=13, num_layers=3)
    model, _ = _sharded(path)
    ids = torch.randint(3, 300, (4, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batched = model(ids).logits
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(4)])
    # Other rows change which rows each expert computes together (matmul shapes), so only fp32 rounding differs.
    assert (batched - alone).abs().max() <= 1e-5


class _RecordingTransport(LocalTransport):
    def __init__(self, shards, placement, events):
        super().__init__(shards, placement)
        self.events = events

    def start(self, layer, plan, rows, counts):
        self.events.append(("start", layer))
        return super().start(layer, plan, rows, counts)

    def finish(self, pending):
        self.events.append(("finish", pending[0]))
        return super().finish(pending)


@pytest.mark.parametrize("arch,shared", [("qwen2_moe", "shared_expert"), ("deepseek_v3", "shared_experts")])
def test_shared_experts_run_while_the_dispatch_is_in_flight(tmp_path, arch, shared):
    path = make_tiny_model(tmp_path / arch, arch=arch, seed=12, num_layers=3)
    ref = _load(path)
    model, shards = _sharded(path)
    events = []
    transport = _RecordingTransport(shards, model.model.layers[-1].mlp.experts.specserve_transport.placement, events)
    moe_layers = sorted(experts_modules(model))
    for layer in moe_layers:
        block = model.model.layers[layer].mlp
        block.experts.specserve_transport = transport
        getattr(block, shared).register_forward_hook(lambda *_, layer=layer: events.append(("shared", layer)))
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert events == [(kind, layer) for layer in moe_layers for kind in ("start", "shared", "finish")]
