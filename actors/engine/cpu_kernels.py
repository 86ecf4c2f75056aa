"""specserve's compiled CPU kernels, built on first use:

- `paged_decode.cpp`: attention of short queries (decodes, verifications) over the paged KV cache. torch's SDPA
  needs each sequence's keys and values contiguous, so the fallback path gathers them out of the cache
  (index_select) for every layer, then runs a flash kernel whose per-call overhead dominates at a few query rows:
  at 16 sequences on a 2-core AVX-512 machine the two took a third to half of a decode step (docs/performance.md).
  The kernel reads each key and value row where it lies.
- `layer_ops.cpp`: a decoder layer's RMSNorm (with the residual add before it) and rotary embedding (with the
  step's keys and values written into the cache), each one call instead of the eager layer's many small ops, with
  the eager ops' results to the bit; used by decoder_forward.py.

Each is compiled once per machine with torch's C++ extension builder (ninja and the C++ compiler torch was built
for, into TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions by default; about half a minute each on 2 cores), for the
CPU it runs on. If they cannot be built, attention falls back to the SDPA path and decoder layers to the model's
own forward, and the log says so once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import types
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# -march=native: the build is for this machine's vector units (AVX-512 where there is one).
_CFLAGS = {
    # -ffast-math at compile time only (not at link, where it would set flush-to-zero for the whole process): it
    # lets the compiler vectorize the float32 sums and exponentials; the kernel uses no infinities.
    "paged_decode": ["-O3", "-march=native", "-ffast-math"],
    # Exact: the float32 operations in the order written (torch's), no fused multiply-add.
    "layer_ops": ["-O3", "-march=native", "-ffp-contract=off"],
}
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_key() -> str:
    """Part of the extension's name: a build cache shared by machines of different CPUs keeps one build each."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = os.uname().machine
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def kernels():
    """The compiled modules (`.paged_decode` with `paged_decode_attention`, `.layer_ops` with `rms_norm` and
    `rope_store`), or None where they cannot be built or are turned off (SPECSERVE_CPU_KERNELS=0). Built once per
    process, the first caller waits."""
    if "modules" in _state:  # every layer of every step asks: no lock once built
        return _state["modules"]
    with _lock:
        if "modules" not in _state:
            _state["modules"] = _build()
        return _state["modules"]


def _build():
    if os.environ.get("SPECSERVE_CPU_KERNELS", "1") == "0":
        log.info("CPU kernels turned off (SPECSERVE_CPU_KERNELS=0): attention uses the SDPA path, decoder layers "
                 "the model's own forward")
        return None
    built = {}
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        for stem, flags in _CFLAGS.items():
            name = f"specserve_{stem}_{_cpu_key()}"
            if not any(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
                log.info("building the CPU kernel %s for this machine (once; about half a minute on 2 cores)", stem)
            built[stem] = load(name=name, sources=[str(Path(__file__).with_name(f"{stem}.cpp"))], extra_cflags=flags,
                               verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the SDPA path and the eager layers still serve
        log.warning("CPU kernels not built (%s); attention uses the slower SDPA path, decoder layers the model's "
                    "own forward", str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        return None
    lanes = _sum_lanes(built["layer_ops"])
    log.info("CPU kernels ready")
    return types.SimpleNamespace(**built, sum_lanes=lanes)


def available() -> bool:
    return kernels() is not None


def _sum_lanes(layer_ops) -> int:
    """The float32 vector width torch's CPU sum reduction adds with in this process (which kernels its dispatch
    picks depends on the CPU and the torch build): the RMSNorm sums its squares in that order, so its result is the
    eager norm's to the bit. Checked on rows of several lengths; if neither width reproduces torch here, 8, and
    the norms may differ from the eager ones in the last bit."""
    x = torch.randn(16, 4099, generator=torch.Generator().manual_seed(0)).square()
    for lanes in (8, 16):
        if all(torch.equal(layer_ops.sum_rows(x[:, :n].contiguous(), lanes), x[:, :n].sum(-1))
               for n in (64, 576, 1000, 4099)):
            return lanes
    log.warning("the fused RMSNorm cannot reproduce torch's summation order here: it may differ from the model's "
                "own norm in the last bit")
    return 8


def paged_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_rows: torch.Tensor,
                 q_offsets: torch.Tensor, slots: torch.Tensor, ctx_offsets: torch.Tensor, visible: torch.Tensor,
                 scale: float, out: torch.Tensor) -> None:
    """Write the attention of the short queries into `out` [T, H, D]; the layout is paged_decode.cpp's."""
    kernels().paged_decode.paged_decode_attention(q, k_cache, v_cache, q_rows, q_offsets, slots, ctx_offsets, visible,
                                                  scale, out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """out = RMSNorm(x) (rows of x [R, N]) as transformers' LlamaRMSNorm computes it; with `residual`, first
    residual += x in place and normalize that sum (the decoder layer's residual connection). out may be x."""
    built = kernels()
    built.layer_ops.rms_norm(x, weight, eps, out, residual, built.sum_lanes)
    return out


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Rotary embedding (transformers' apply_rotary_pos_emb) of q [T, H * D] in place and of k [T, Hkv * D] into
    k_cache[slots] [S, Hkv, D]; v into v_cache[slots]. cos, sin: [T, D]."""
    kernels().layer_ops.rope_store(q, k, v, cos, sin, slots, k_cache, v_cache)
