"""The draft model of a drafter replica, by method:

- model:      a separate (smaller) checkpoint that must share the target's tokenizer;
- layer_skip: the target with a subset of its decoder layers (self-draft, as in SWIFT / DEL): fewer weights
              read per token, same embeddings and head, no second checkpoint;
- int8:       the target with its linear layers dynamically quantized to int8 (CPU), a quarter of the bytes
              of float32 weights per token.
"""

from __future__ import annotations

import torch

from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.model_loader import LoadedModel, ModelLoadError, load_model, resolve_model_path


def skip_layers(model, keep: list[int]):
    """Keep only decoder layers `keep` (in order); the paged KV cache is sized from the new layer count."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = inner.layers
    if not keep or any(not 0 <= i < len(layers) for i in keep) or sorted(set(keep)) != list(keep):
        raise ValueError(f"layer_skip layers must be distinct ascending indices in [0, {len(layers)})")
    inner.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(inner.layers):
        layer.self_attn.layer_idx = new_idx
    cfg = model.config.get_text_config()
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    return model


def default_kept_layers(num_layers: int, fraction: float) -> list[int]:
    """Evenly spaced layers, always the first and the last (they matter most for the output distribution)."""
    n = max(2, min(num_layers, round(num_layers * fraction)))
    if n >= num_layers:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


def check_same_tokenizer(draft_tok, target_tok, draft_name: str, target_name: str) -> None:
    if draft_tok.get_vocab() != target_tok.get_vocab():
        raise ModelLoadError(f"draft model '{draft_name}' has a different tokenizer than the target "
                             f"'{target_name}': speculative decoding needs the same token ids on both sides")


def _pack(loaded: LoadedModel, model_cfg) -> None:
    if model_cfg.pack_weights:  # CPU weights only (see pack_linear_weights)
        from specserve.actors.packed_linear import pack_linear_weights

        pack_linear_weights(loaded.model)


def build_draft_model(method: str, model_cfg, spec_cfg) -> LoadedModel:
    """Load the draft model for `method` (model_cfg: the target's ModelConfig; spec_cfg: SpeculativeConfig)."""
    if method == "model":
        if not spec_cfg.draft_model:
            raise ModelLoadError("speculative.method 'model' needs speculative.draft_model")
        draft_cfg = model_cfg.model_copy(update={"source": spec_cfg.draft_model, "served_name": None})
        draft = load_model(draft_cfg, attn_implementation=ATTN_IMPLEMENTATION)
        from transformers import AutoTokenizer

        target_tok = AutoTokenizer.from_pretrained(resolve_model_path(model_cfg.source, model_cfg.cache_dir))
        check_same_tokenizer(draft.tokenizer, target_tok, spec_cfg.draft_model, model_cfg.source)
        _pack(draft, model_cfg)
        return draft
    if method == "layer_skip":
        loaded = load_model(model_cfg, attn_implementation=ATTN_IMPLEMENTATION)
        n = loaded.config.get_text_config().num_hidden_layers
        keep = list(spec_cfg.layer_skip_layers or default_kept_layers(n, spec_cfg.layer_skip_fraction))
        skip_layers(loaded.model, keep)
        _pack(loaded, model_cfg)
        return loaded
    if method == "int8":
        cfg = model_cfg.model_copy(update={"dtype": "float32"})
        loaded = load_model(cfg, attn_implementation=ATTN_IMPLEMENTATION)
        if loaded.device.type != "cpu":
            raise ModelLoadError("speculative.method 'int8' uses PyTorch dynamic int8 quantization, which runs "
                                 "on CPU only; use layer_skip or model on GPUs")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # Per-channel scales: the draft agrees with the target more often than with one scale per tensor, and
        # runs faster (docs/measurements.md).
        loaded.model = quantize_dynamic(loaded.model, {torch.nn.Linear: per_channel_dynamic_qconfig},
                                        dtype=torch.qint8)
        return loaded
    raise ValueError(f"unknown draft method {method!r}")
