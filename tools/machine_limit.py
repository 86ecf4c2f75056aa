"""How fast this machine could run a model's decode step at best: the floors `specserve bench-forward` sets the
engine's step against.

Two floors per step of R rows (R sequences decoding one token each):
- **the linears alone**: every linear layer of the model (the LM head included) run back to back on an [R, in]
  input, with the kernels the engine uses (oneDNN-packed where the verifier packs them) and nothing else: no
  attention, norms, sampling or Python around them. What the engine's step costs above it is everything else.
- **reading the weights once**: the linear weights' bytes over the memory bandwidth measured by summing a tensor
  far larger than the caches. A decode step reads every weight at least once, and between steps they leave the
  caches (even a 480 MiB L3 did not keep SmolLM2's 269 MB: docs/performance.md, "The floors"), so no kernel does
  a step faster than this at small R; at larger R the matmuls' arithmetic decides, which the linears-alone floor
  includes.
Both are measured with this process's torch threads, so compare them with a step run with the same threads.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from specserve.actors.packed_linear import PackedLinear


@dataclass
class MachineLimit:
    stream_gb_s: float  # memory read bandwidth: one pass over a 1 GiB tensor (stream_mib), median of several
    weight_mb: float  # bytes of the model's linear weights (what one decode step must read at least)
    linears_ms: dict[int, float] = field(default_factory=dict)  # rows -> the model's linears alone, ms per step

    def read_floor_ms(self) -> float:
        return self.weight_mb / self.stream_gb_s  # MB / (GB/s) = ms


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]


def _weight(linear: nn.Module) -> torch.Tensor:
    return linear.packed_weight if isinstance(linear, PackedLinear) else linear.weight


def _weight_bytes(linear: nn.Module) -> int:
    # A packed weight's storage can be padded to oneDNN's blocks; the layer reads in x out values either way.
    return linear.in_features * linear.out_features * _weight(linear).dtype.itemsize


def _median_s(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stream_gb_s(mib: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth of this process's torch threads: a sum over a tensor much larger than the last-level cache."""
    x = torch.ones(mib << 20 >> 2, dtype=torch.float32)
    return x.numel() * 4 / _median_s(x.sum, repeats) / 1e9


@torch.inference_mode()
def linears_ms(model: nn.Module, rows: int, repeats: int = 5) -> float:
    """ms to run every linear layer of `model` once on an [rows, in_features] input, in order."""
    layers = _linears(model)
    dtype, device = _weight(layers[0]).dtype, _weight(layers[0]).device  # a packed model may have no parameters
    inputs = {n: torch.randn(1, rows, n, dtype=dtype, device=device) for n in {m.in_features for m in layers}}

    def run_all():
        for m in layers:
            m(inputs[m.in_features])
    return _median_s(run_all, repeats) * 1e3


def measure(model: nn.Module, rows: list[int], repeats: int = 5, stream_mib: int = 1024) -> MachineLimit:
    limit = MachineLimit(stream_gb_s=stream_gb_s(stream_mib),
                         weight_mb=sum(map(_weight_bytes, _linears(model))) / 1e6)
    for r in rows:
        limit.linears_ms[r] = linears_ms(model, r, repeats)
    return limit
