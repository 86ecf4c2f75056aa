"""KV namespaces: everything that makes two replicas' KV blocks interchangeable, digested into one id.

Two blocks with the same tokens are the same bytes only if the model, its weights, the KV dtype, the block size
and the attention geometry all match; a tenant must never hit (or time) another tenant's prefixes. The namespace
id roots every block hash (routing/block_hash.py), so blocks of different namespaces can never share a key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# Files whose bytes decide the KV a model computes. Tokenizer files do not (blocks are keyed by token ids).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_REVISION_CACHE = ".specserve-weights-revision.json"


@dataclass(frozen=True)
class KVNamespace:
    model: str
    weights_revision: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    sharding: str = "none"
    tenant: str = "default"

    @property
    def id(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def weights_revision(model_dir: str | os.PathLike) -> str:
    """sha256 over config.json and every weights file (name and bytes), in name order.

    Reading 540 MB takes about 0.7 s here, so the digest is remembered in the directory, keyed by each file's
    size and mtime; a directory we cannot write to is simply hashed every time.
    """
    root = Path(model_dir)
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"))
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"no weights files in {root}")
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    cache = root / _REVISION_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return cached["revision"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 23):
                fh.update(chunk)
        h.update(fh.digest())
    revision = h.hexdigest()[:32]
    try:
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"files": stamp, "revision": revision}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return revision


def kv_namespace(config, model_path: str | os.PathLike, hf_config) -> KVNamespace:
    """The namespace of a deployment (a SpecserveConfig serving the model at `model_path`): what the verifiers
    key their blocks with and what the router hashes prompts with."""
    from specserve.actors.engine.model_runner import kv_geometry

    layers, kv_heads, head_dim = kv_geometry(hf_config)
    return KVNamespace(model=config.model.name, weights_revision=weights_revision(model_path),
                       dtype=config.model.dtype, block_size=config.engine.block_size, num_layers=layers,
                       num_kv_heads=kv_heads, head_dim=head_dim, tenant=config.kv_store.tenant)


def tenant_namespace(namespace_id: str, tenant: str | None, default_tenant: str) -> str:
    """The hash namespace of one tenant's requests. The default tenant is already in the deployment's namespace
    id; any other tenant roots its block hashes elsewhere, so it can neither hit nor time another's prefixes
    (in the engine's cache, the KV store or the router's index alike)."""
    if not tenant or tenant == default_tenant:
        return namespace_id
    return f"{namespace_id}/tenant/{tenant}"
