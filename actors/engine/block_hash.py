"""Chained block hashes: the one definition shared by the engine's prefix cache, the KV store and the router.

h_i = blake2b-128(h_{i-1} || uint32-le(tokens of block i)), rooted at a digest of the namespace (model, dtype,
tenant, ... : everything that makes KV incompatible). Deterministic across processes and machines, unlike `hash()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

DIGEST_SIZE = 16


def root_hash(namespace: str = "") -> bytes:
    return hashlib.blake2b(namespace.encode(), digest_size=DIGEST_SIZE, person=b"specserve-ns").digest()


def chain_hash(parent: bytes, block_tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=DIGEST_SIZE, person=b"specserve-blk")
    h.update(np.asarray(block_tokens, dtype="<u4").tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, namespace: str = "",
                 parent: bytes | None = None, start_block: int = 0) -> list[bytes]:
    """Hashes of the full blocks of `token_ids` from block `start_block` on, chained from `parent`
    (the hash of block start_block-1, or the namespace root when start_block is 0)."""
    h = root_hash(namespace) if parent is None else parent
    out = []
    for b in range(start_block, len(token_ids) // block_size):
        h = chain_hash(h, token_ids[b * block_size:(b + 1) * block_size])
        out.append(h)
    return out
