"""Read only some experts' weights from a checkpoint's safetensors files (an expert shard never loads the model).

Two layouts: per-expert tensors, as Mixtral (`experts.{e}.w1/w3/w2`) and Qwen-MoE, OLMoE, DeepSeek checkpoints
(`experts.{e}.gate_proj/up_proj/down_proj`) are published; and fused 3-D tensors (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]) as transformers 5 holds them, of which only the needed slices are read.
Either way a shard gets, per (layer, expert), gate_up [2I, H] (gate rows first, as transformers fuses them) and
down [H, I]. Dense models' MLPs load the same way, split along their intermediate dimension: FFN shard i of a
layer is the expert made of rows i of gate_proj and up_proj and columns i of down_proj.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

_PER_EXPERT = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
_DENSE = re.compile(r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path}")
    return files


def _keys(path: Path):
    """(key, open file) for every tensor of the checkpoint."""
    for file in _files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f


def _fused_slots(parts: dict, slots: set[tuple[int, int]], path, what: str, dtype) -> dict:
    out = {}
    for slot in sorted(slots):
        p = parts.get(slot, {})
        if "gate_up" not in p and "gate" in p and "up" in p:
            p["gate_up"] = torch.cat([p["gate"], p["up"]], dim=0)
        if "gate_up" not in p or "down" not in p:
            raise KeyError(f"checkpoint {path} has no weights for layer {slot[0]} {what} {slot[1]}")
        gate_up, down = p["gate_up"], p["down"]
        if dtype is not None:
            gate_up, down = gate_up.to(dtype), down.to(dtype)
        out[slot] = (gate_up.contiguous(), down.contiguous())
    return out


def load_experts(path: str | Path, slots: set[tuple[int, int]],
                 dtype: torch.dtype | None = None) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, expert) -> (gate_up, down) for every slot asked for; KeyError naming the first one missing."""
    parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, f in _keys(Path(path)):
        m = _PER_EXPERT.search(key)
        if m:
            slot = (int(m.group(1)), int(m.group(2)))
            if slot in slots:
                parts.setdefault(slot, {})[_PART[m.group(3)]] = f.get_tensor(key)
            continue
        m = _FUSED.search(key)
        if m:
            layer, name = int(m.group(1)), m.group(2)
            wanted = sorted(e for (l, e) in slots if l == layer)
            sl = f.get_slice(key) if wanted else None
            for e in wanted:  # reads only these experts' rows of the 3-D tensor
                parts.setdefault((layer, e), {})["gate_up" if name == "gate_up_proj" else "down"] = sl[e]
    return _fused_slots(parts, slots, path, "expert", dtype)


def _shard_range(size: int, index: int, num_shards: int) -> tuple[int, int]:
    step = -(-size // num_shards)
    return index * step, min(size, (index + 1) * step)


def load_ffn_shards(path: str | Path, slots: set[tuple[int, int]], num_shards: int,
                    dtype: torch.dtype | None = None) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, shard) -> (gate_up, down) of dense MLP shards: only the slices asked for are read."""
    parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, f in _keys(Path(path)):
        m = _DENSE.search(key)
        if not m:
            continue
        layer, name = int(m.group(1)), _PART[m.group(2)]
        sl = f.get_slice(key)
        rows, cols = sl.get_shape()
        for (l, i) in slots:
            if l != layer:
                continue
            if name == "down":  # [H, I]: this shard's columns
                a, b = _shard_range(cols, i, num_shards)
                parts.setdefault((l, i), {})[name] = sl[:, a:b]
            else:  # [I, H]: this shard's rows
                a, b = _shard_range(rows, i, num_shards)
                parts.setdefault((l, i), {})[name] = sl[a:b]
    return _fused_slots(parts, slots, path, "MLP shard", dtype)
