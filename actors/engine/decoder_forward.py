"""The forward of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE) written out over the
paged KV cache, for CPU: each layer is its linears, two fused RMSNorm calls (the residual add folded in), one call
for the rotary embedding and the cache write, the attention, and the MLP's activation.

Why: the eager transformers layer runs about forty small torch ops and a dozen module calls around its seven
linears, each a Python call and an op dispatch of a few microseconds. At 16 decoding sequences on one core that was
a fifth of a step (docs/performance.md, "The decoder layer in fewer calls").

The arithmetic is the eager layer's (see layer_ops.cpp), so greedy output stays token-identical to the model's own
forward (tests/unit/test_decoder_forward.py, and the engine's greedy tests against generate run through this path).
Models of another shape, or whose parts were swapped (expert dispatch replaces an MLP's forward), keep those parts'
own modules; a model whose layers are not recognised runs its own forward (`build` says why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from specserve.actors.engine import cpu_kernels
from specserve.actors.engine.attention import AttentionMetadata, KVCache, attend
from specserve.actors.packed_linear import PackedLinear

log = logging.getLogger(__name__)

# Causal LMs whose decoder layers are transformers' Llama layer or a copy of it (pre-norm, RMSNorm in float32,
# rotate-half rotary embedding, gated SiLU MLP or a mixture of experts).
SUPPORTED_MODELS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                    "MixtralForCausalLM", "Qwen2MoeForCausalLM"}
_PREFIXES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Mixtral", "Qwen2Moe")
_RMS_NORMS = {p + "RMSNorm" for p in _PREFIXES}
_ATTENTIONS = {p + "Attention" for p in _PREFIXES}
_LAYERS = {p + "DecoderLayer" for p in _PREFIXES}
_GATED_MLPS = {p + "MLP" for p in _PREFIXES}


@dataclass
class _Norm:
    weight: torch.Tensor
    eps: float


@dataclass
class _Layer:
    index: int
    input_norm: _Norm
    post_norm: _Norm
    q: Callable
    k: Callable
    v: Callable
    o: Callable
    q_norm: _Norm | None  # Qwen3: an RMSNorm over each head's query and key before the rotary embedding
    k_norm: _Norm | None
    head_dim: int
    scaling: float
    mlp: Callable  # [T, hidden] -> [T, hidden]


def _own_forward(module: nn.Module) -> bool:
    """Whether the module runs its class's forward (nothing installed over it on the instance)."""
    return "forward" not in vars(module)


def _norm(module: nn.Module) -> _Norm | None:
    if type(module).__name__ not in _RMS_NORMS or not _own_forward(module):
        return None
    return _Norm(module.weight.detach(), float(module.variance_epsilon))


def _linear(module: nn.Module) -> Callable:
    """The linear as a plain call: the packed oneDNN op on its packed weight, F.linear, or the module itself."""
    if type(module) is PackedLinear:
        op, weight, bias = torch.ops.mkldnn._linear_pointwise, module.packed_weight, module.bias
        return lambda x: op(x, weight, bias, "none", [], "")
    if type(module) is nn.Linear:
        return lambda x: F.linear(x, module.weight, module.bias)
    return module


def _gated_silu(mlp: nn.Module) -> Callable | None:
    """down(silu(gate(x)) * up(x)) for transformers' gated MLPs with a SiLU, else None."""
    if type(mlp).__name__ not in _GATED_MLPS or not _own_forward(mlp):
        return None
    if not isinstance(mlp.act_fn, nn.SiLU) and type(mlp.act_fn).__name__ != "SiLUActivation":
        return None
    gate, up, down = _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj)
    return lambda x: down(F.silu(gate(x), inplace=True).mul_(up(x)))


def _module_mlp(mlp: nn.Module) -> Callable:
    """Any other MLP (a mixture of experts, an expert-dispatched dense MLP): its module on [1, T, hidden]."""
    def run(x):
        out = mlp(x.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out)[0]
    return run


class DecoderForward:
    """Call it with the step's packed tokens instead of the model: (input ids [T], positions [T], rows to keep [K],
    the KV cache, the step's AttentionMetadata) -> logits [K, vocab] in the model's dtype."""

    def __init__(self, embed: nn.Module, rotary: nn.Module, layers: list[_Layer], final_norm: _Norm,
                 lm_head: Callable):
        self.embed, self.rotary, self.layers, self.final_norm, self.lm_head = embed, rotary, layers, final_norm, lm_head

    @classmethod
    def build(cls, model: nn.Module) -> tuple[DecoderForward | None, str]:
        """The forward for `model`, or None and why not (the model then runs its own forward)."""
        name = type(model).__name__
        if name not in SUPPORTED_MODELS:
            return None, f"{name} is not one of the Llama-family models this forward knows"
        if next(model.parameters()).device.type != "cpu":
            return None, "the fused layer ops run on CPU"
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.bfloat16):
            return None, f"the fused layer ops run float32 and bfloat16, not {dtype}"
        if not cpu_kernels.available():
            return None, "the CPU kernels did not build"
        inner = model.model
        parts = (model, inner, inner.embed_tokens, inner.rotary_emb)
        if not all(_own_forward(m) for m in parts) or not isinstance(inner.embed_tokens, nn.Embedding):
            return None, "the model's forward, embedding or rotary embedding was replaced"
        final_norm = _norm(inner.norm)
        if final_norm is None:
            return None, f"final norm {type(inner.norm).__name__} is not a Llama-style RMSNorm"
        layers = []
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            norms = (_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm))
            if type(layer).__name__ not in _LAYERS or not _own_forward(layer) or None in norms:
                return None, f"layer {i} ({type(layer).__name__}) is not a Llama-style decoder layer"
            if type(attn).__name__ not in _ATTENTIONS or not _own_forward(attn) or attn.layer_idx != i:
                return None, f"layer {i}'s attention ({type(attn).__name__}) is not a Llama-style attention"
            q_norm = k_norm = None
            if hasattr(attn, "q_norm"):
                q_norm, k_norm = _norm(attn.q_norm), _norm(attn.k_norm)
                if q_norm is None or k_norm is None:
                    return None, f"layer {i}'s query/key norms are not Llama-style RMSNorms"
            mlp = _gated_silu(layer.mlp) or _module_mlp(layer.mlp)
            layers.append(_Layer(i, norms[0], norms[1], _linear(attn.q_proj), _linear(attn.k_proj),
                                 _linear(attn.v_proj), _linear(attn.o_proj), q_norm, k_norm, attn.head_dim,
                                 attn.scaling, mlp))
        return cls(inner.embed_tokens, inner.rotary_emb, layers, final_norm, _linear(model.lm_head)), ""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, kv_cache: KVCache,
                 meta: AttentionMetadata) -> torch.Tensor:
        residual = self.embed(input_ids)  # [T, hidden]; then the running sum of the layers' outputs
        cos, sin = self.rotary(residual, positions.unsqueeze(0))  # [1, T, D] each, in the model's dtype
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        rows = residual.shape[0]
        x = torch.empty_like(residual)  # each norm's output, the next linears' input
        cpu_kernels.rms_norm(residual, self.layers[0].input_norm.weight, self.layers[0].input_norm.eps, x)
        out = None
        for layer in self.layers:
            if out is not None:  # the previous layer's MLP output joins the residual before this layer's norm
                cpu_kernels.rms_norm(out, layer.input_norm.weight, layer.input_norm.eps, x, residual)
            q, k, v = layer.q(x), layer.k(x), layer.v(x)
            if layer.q_norm is not None:
                d = layer.head_dim
                cpu_kernels.rms_norm(q.view(-1, d), layer.q_norm.weight, layer.q_norm.eps, q.view(-1, d))
                cpu_kernels.rms_norm(k.view(-1, d), layer.k_norm.weight, layer.k_norm.eps, k.view(-1, d))
            cpu_kernels.rope_store(q, k, v, cos, sin, meta.slot_mapping, kv_cache.k[layer.index],
                                   kv_cache.v[layer.index])
            attn = attend(kv_cache, meta, layer.index, q.view(rows, -1, layer.head_dim), layer.scaling)
            attn = layer.o(attn.view(rows, -1))
            cpu_kernels.rms_norm(attn, layer.post_norm.weight, layer.post_norm.eps, x, residual)
            out = layer.mlp(x)
        cpu_kernels.rms_norm(out, self.final_norm.weight, self.final_norm.eps, x, residual)
        return self.lm_head(x.index_select(0, keep))
