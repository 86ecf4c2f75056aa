"""Linear layers whose weights are packed once for oneDNN (CPU), instead of on every call.

On CPU, torch's F.linear reorders a bfloat16 weight into oneDNN's blocked layout on each call, and runs a float32
one through MKL's sgemm; a weight packed once at load skips that. Measured on this project's 2-core AVX-512
machine (docs/performance.md, "The forward"): SmolLM2's linears 1.3-1.9x faster in bfloat16 (bit-identical) and
1.3-3x in float32 (within 3e-6); the engine's decode step 1.2-1.5x faster in bfloat16, 1.5-2x in float32.
Packing is checked per weight shape against F.linear and skipped where oneDNN cannot pack that dtype (e.g.
float16 without AVX512-FP16).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# How far a packed linear may be from F.linear on a check input, relative to the output's scale: float32 sums in
# another order (~1e-6); bfloat16 goes through oneDNN either way.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class PackedLinear(nn.Module):
    """nn.Linear's forward over a oneDNN-packed copy of its weight (the original is dropped unless shared)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _packs_correctly(linear: nn.Linear) -> bool:
    """Whether oneDNN packs this weight's dtype here and its output matches F.linear on a random input."""
    w = linear.weight
    tolerance = _TOLERANCE.get(w.dtype)
    if tolerance is None:
        return False
    try:
        packed = PackedLinear(linear)
        x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(w.dtype)
        expected = F.linear(x, w, linear.bias).float()
        got = packed(x).float()
    except RuntimeError as exc:  # no oneDNN kernel for this dtype on this CPU
        log.info("linear weights stay unpacked: %s", str(exc).splitlines()[0])
        return False
    scale = expected.abs().max().clamp_min(1e-6)
    return bool(((got - expected).abs().max() / scale) <= tolerance)


@torch.no_grad()
def pack_linear_weights(model: nn.Module) -> int:
    """Replace every nn.Linear of a CPU model by a PackedLinear (see the module docstring); returns how many.
    Call it after anything that reads or replaces linear weights (expert sharding, quantization)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    checked: dict[tuple, bool] = {}
    targets = []
    for module in model.modules():
        for child_name, child in module.named_children():
            if type(child) is not nn.Linear or child.weight.device.type != "cpu" or child.weight.numel() == 0:
                continue
            key = (tuple(child.weight.shape), child.weight.dtype, child.bias is not None)
            if key not in checked:
                checked[key] = _packs_correctly(child)
            if checked[key]:
                targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, PackedLinear(child))
    return len(targets)
