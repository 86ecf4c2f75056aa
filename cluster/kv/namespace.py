"""KV namespaces: everything that makes two replicas' KV blocks interchangeable, digested into one id.

Two blocks with the same tokens are the same bytes only if the model, its weights, the KV dtype, the block size
and the attention geometry all match; a tenant must never hit (or time) another tenant's prefixes. The namespace
id roots every block hash (actors/engine/block_hash.py), so blocks of different namespaces can never share a key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Files whose bytes decide the KV a model computes. Tokenizer files do not (blocks are keyed by token ids).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_DIGEST_CACHE = ".specserve-weights-digests.json"
# The byte layout of a block payload (cluster/kv/payload.py: K then V, [2, layers, block_size, kv_heads,
# head_dim], in the engine's dtype). Bump it when that layout changes: every namespace id changes with it, so no
# replica ever reads a block written in another layout.
KV_FORMAT_VERSION = 1
# A file changed this recently may still be changing within the same timestamp tick: its digest is not
# remembered (git's "racily clean" rule), so the next call hashes it again.
_SETTLE_NS = 2_000_000_000


@dataclass(frozen=True)
class KVNamespace:
    model: str
    weights_revision: str
    # model.dtype as configured. "auto" resolves per replica's hardware, which the ingress (hashing for the
    # router) cannot see; replicas of one namespace whose dtypes differ still never mix blocks, because the
    # store's index refuses an entry whose layout (dtype, shape) differs from the reader's.
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    sharding: str = "none"
    tenant: str = "default"
    kv_format: int = KV_FORMAT_VERSION

    @property
    def id(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def weights_revision(model_dir: str | os.PathLike) -> str:
    """sha256 over config.json and every weights file (name and content digest), in name order.

    Hashing every weights file is a noticeable part of a replica's start (docs/measurements.md), so each file's
    content digest is remembered, keyed by its inode, size, mtime and ctime. Size and mtime alone can be kept by a
    replaced file (`rsync -t`, `touch -r`); ctime cannot be set by a user (os.utime sets it to now) and a file
    replaced by a rename has another inode, so a changed file is always hashed again. The digests are kept in the
    directory, or in the user's cache when the directory is read-only; with neither writable every file is hashed
    every time.
    """
    root = Path(model_dir).resolve()
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"))
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"no weights files in {root}")
    caches = [root / _DIGEST_CACHE]
    try:
        user_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        name = hashlib.sha256(bytes(root)).hexdigest()[:32]  # one file per model directory
        caches.append(user_dir / "specserve" / "weights-digests" / f"{name}.json")
    except RuntimeError:  # no home directory: the model directory or nothing
        pass
    known: list[dict] = []
    for cache in caches:
        try:
            entries = json.loads(cache.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            entries = None
        known.append(entries if isinstance(entries, dict) else {})
    digests: dict[str, dict] = {}
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        stamp = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        digest = next((e["sha256"] for e in (k.get(p.name) for k in known)
                       if isinstance(e, dict) and e.get("stamp") == stamp and isinstance(e.get("sha256"), str)), None)
        if digest is None:
            started = time.time_ns()
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 23):
                    fh.update(chunk)
            digest = fh.hexdigest()
            after = p.stat()
            if [after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns] != stamp or (
                    started - max(st.st_mtime_ns, st.st_ctime_ns) < _SETTLE_NS):
                stamp = None  # changed while (or just before) it was read: do not remember this digest
        h.update(p.name.encode() + b"\0" + bytes.fromhex(digest))
        if stamp is not None:
            digests[p.name] = {"stamp": stamp, "sha256": digest}
    for cache, cached in zip(caches, known):  # the directory first; the user's cache if it is read-only
        if digests == cached:
            break
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"files": digests}))
            os.replace(tmp, cache)
            break
        except OSError:
            continue
    return h.hexdigest()[:32]


def kv_namespace(config, model_path: str | os.PathLike, geometry: tuple[int, int, int]) -> KVNamespace:
    """The namespace of a deployment (a SpecserveConfig serving the model at `model_path`, whose KV cache has
    `geometry` = (layers, KV heads, head dim), see model_runner.kv_geometry): what the verifiers key their blocks
    with and what the router hashes prompts with."""
    layers, kv_heads, head_dim = geometry
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
