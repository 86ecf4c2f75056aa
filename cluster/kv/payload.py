"""Block payloads: a block's KV as raw bytes, with the layout and checksum the index records beside it.

A block travels as the bytes of a [2, layers, block_size, kv_heads, head_dim] tensor (K then V) in the
engine's dtype; bfloat16 has no numpy dtype, so bytes (uint8) are the common currency. Blocks exported together
are one contiguous buffer, so a batch costs one object-store put, not one per block.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch



def torch_dtype(name: str) -> torch.dtype:
    """A layout's dtype name ("bfloat16", as str(tensor.dtype) without "torch.") -> the torch dtype."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"block layout: unknown dtype '{name}'")
    return dtype


@dataclass(frozen=True)
class BlockLayout:
    """What one block looks like; readers refuse blocks whose recorded layout differs from theirs."""

    dtype: str  # "bfloat16", "float32", "float16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch_dtype(self.dtype).itemsize

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @classmethod
    def of(cls, block: torch.Tensor) -> "BlockLayout":
        return cls(str(block.dtype).removeprefix("torch."), tuple(block.shape))


def checksum(buf) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


def blocks_to_bytes(blocks: torch.Tensor) -> np.ndarray:
    """[n, *block_shape] tensor -> contiguous uint8 array of n equal parts (no copy if already contiguous CPU)."""
    t = blocks.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().reshape(len(t), -1)


def bytes_to_block(buf, layout: BlockLayout) -> torch.Tensor:
    """A block tensor over `buf` (no copy). `buf` may be read-only (object store); the tensor is only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that a read-only buffer is not writable
        raw = torch.frombuffer(memoryview(buf).cast("B"), dtype=torch.uint8)
    if raw.numel() != layout.nbytes:
        raise ValueError(f"block payload has {raw.numel()} bytes, layout {layout} needs {layout.nbytes}")
    return raw.view(torch_dtype(layout.dtype)).view(layout.shape)
