"""Plugs expert dispatch into a transformers model: its own routers run unchanged in the verifier, and every MoE
layer's expert computation goes through a transport (local shards, or expert actors) instead.

transformers 5 lets a model's experts forward be swapped by name (`ALL_EXPERTS_FUNCTIONS.register` +
`set_experts_implementation`); the swapped function gets (hidden rows, top-k expert ids, top-k weights).
"""

from __future__ import annotations

import types
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from specserve.actors.experts.dispatch import ExpertRows, combine, gather_rows, plan_dispatch

IMPLEMENTATION = "specserve_dispatch"


class ExpertTransport(Protocol):
    def start(self, layer: int, plan: list[ExpertRows], rows: torch.Tensor, counts: list[int]) -> object:
        """Send the planned experts' rows; returns what `finish` needs."""

    def finish(self, pending: object) -> list[torch.Tensor]:
        """Each planned expert's unweighted outputs, in plan order."""


def _dispatch_start(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> tuple:
    plan = plan_dispatch(top_k_index, experts.num_experts)
    rows, counts = gather_rows(hidden_states, plan)
    return plan, experts.specserve_transport.start(experts.specserve_layer, plan, rows, counts)


def _dispatch_finish(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_weights: torch.Tensor,
                     started: tuple) -> torch.Tensor:
    plan, pending = started
    return combine(hidden_states, plan, experts.specserve_transport.finish(pending), top_k_weights)


def _dispatch_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
    started = _dispatch_start(self, hidden_states, top_k_index)
    return _dispatch_finish(self, hidden_states, top_k_weights, started)


# Blocks with shared experts: the same ops as the model's own forward, reordered so the shared experts run while
# the routed rows are away (results are unchanged: the shared output does not depend on the routing).
def _gated_shared_expert_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # Qwen2-MoE
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    x = hidden_states.view(-1, hidden_dim)
    _, routing_weights, selected_experts = self.gate(x)
    started = _dispatch_start(self.experts, x, selected_experts)
    shared = self.shared_expert(x)
    routed = _dispatch_finish(self.experts, x, routing_weights, started)
    shared = F.sigmoid(self.shared_expert_gate(x)) * shared
    return (routed + shared).reshape(batch_size, sequence_length, hidden_dim)


def _shared_experts_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # DeepSeek-V3
    residuals, orig_shape = hidden_states, hidden_states.shape
    _, topk_weights, topk_indices = self.gate(hidden_states)
    x = hidden_states.view(-1, hidden_states.shape[-1])
    started = _dispatch_start(self.experts, x, topk_indices)
    shared = self.shared_experts(residuals)
    return _dispatch_finish(self.experts, x, topk_weights, started).view(*orig_shape) + shared


OVERLAPPED_BLOCK_FORWARDS = {"Qwen2MoeSparseMoeBlock": _gated_shared_expert_forward,
                             "DeepseekV3MoE": _shared_experts_forward}


def experts_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> the layer's experts module (modules with 3-D expert weights and the swappable forward)."""
    out = {}
    for name, module in model.named_modules():
        if name.endswith(".experts") and hasattr(module, "gate_up_proj") and hasattr(module, "num_experts"):
            layer = next(int(p) for p in name.split(".") if p.isdigit())
            out[layer] = module
    return out


def install_dispatch(model: torch.nn.Module, transport: ExpertTransport, *,
                     drop_local_weights: bool = True) -> list[int]:
    """Route every MoE layer of `model` through `transport`; returns the MoE layer indices. The local expert
    weights are freed (the transport holds them), unless asked to keep them (tests compare against them)."""
    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _dispatch_forward)
    modules = experts_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no MoE experts to dispatch")
    for block in model.modules():
        if (forward := OVERLAPPED_BLOCK_FORWARDS.get(type(block).__name__)) is not None:
            block.forward = types.MethodType(forward, block)
    for layer, module in modules.items():
        module.specserve_transport = transport
        module.specserve_layer = layer
        if drop_local_weights:
            module.gate_up_proj = torch.nn.Parameter(module.gate_up_proj.new_empty(0), requires_grad=False)
            module.down_proj = torch.nn.Parameter(module.down_proj.new_empty(0), requires_grad=False)
    model.set_experts_implementation(IMPLEMENTATION)
    return sorted(modules)


def mlp_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> the dense gated MLP of each decoder layer (gate_proj, up_proj, down_proj)."""
    out = {}
    for name, module in model.named_modules():
        if name.endswith(".mlp") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            layer = next(int(p) for p in name.split(".") if p.isdigit())
            out[layer] = module
    return out


def install_ffn_dispatch(model: torch.nn.Module, transport: ExpertTransport, num_shards: int, *,
                         drop_local_weights: bool = True) -> list[int]:
    """Run every dense MLP as `num_shards` slices of its intermediate dimension through `transport` (slice i is
    "expert" i of the layer), summing the slices' outputs in order."""
    modules = mlp_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no gated MLPs to shard")
    for layer, module in modules.items():
        def forward(x, layer=layer):
            rows = x.reshape(-1, x.shape[-1])
            everyone = torch.arange(rows.shape[0], device=rows.device)
            plan = [ExpertRows(i, everyone, torch.zeros_like(everyone)) for i in range(num_shards)]
            pending = transport.start(layer, plan, rows.repeat(num_shards, 1), [rows.shape[0]] * num_shards)
            outputs = transport.finish(pending)
            total = outputs[0]
            for out in outputs[1:]:
                total = total + out
            return total.reshape(x.shape)

        module.forward = forward
        if drop_local_weights:
            for p in ("gate_proj", "up_proj", "down_proj"):
                getattr(module, p).weight = torch.nn.Parameter(getattr(module, p).weight.new_empty(0),
                                                               requires_grad=False)
    return sorted(modules)
