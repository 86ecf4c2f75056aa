"""Read only some experts' weights from a checkpoint's safetensors files (an expert shard never loads the model).

Two layouts: per-expert tensors, as Mixtral (`experts.{e}.w1/w3/w2`) and Qwen-MoE, OLMoE, DeepSeek checkpoints
(`experts.{e}.gate_proj/up_proj/down_proj`) are published; and fused 3-D tensors (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]) as transformers 5 holds them, of which only the needed slices are read.
Either way a shard gets, per (layer, expert), gate_up [2I, H] (gate rows first, as transformers fuses them) and
down [H, I].
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


def load_experts(path: str | Path, slots: set[tuple[int, int]],
                 dtype: torch.dtype | None = None) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, expert) -> (gate_up, down) for every slot asked for; KeyError naming the first one missing."""
    parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for file in _files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
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
                    if wanted:
                        sl = f.get_slice(key)
                        for e in wanted:  # reads only this expert's rows of the 3-D tensor
                            parts.setdefault((layer, e), {})["gate_up" if name == "gate_up_proj" else "down"] = sl[e]
    out = {}
    for slot in sorted(slots):
        p = parts.get(slot, {})
        if "gate_up" not in p and "gate" in p and "up" in p:
            p["gate_up"] = torch.cat([p["gate"], p["up"]], dim=0)
        if "gate_up" not in p or "down" not in p:
            raise KeyError(f"checkpoint {path} has no weights for layer {slot[0]} expert {slot[1]}")
        gate_up, down = p["gate_up"], p["down"]
        if dtype is not None:
            gate_up, down = gate_up.to(dtype), down.to(dtype)
        out[slot] = (gate_up.contiguous(), down.contiguous())
    return out
