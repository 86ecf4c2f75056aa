"""The compiled kernel for short queries over the paged KV cache (paged_decode.cpp), built on first use.

torch's SDPA needs each sequence's keys and values contiguous, so the fallback path gathers them out of the cache
(index_select) for every layer, then runs a flash kernel whose per-call overhead dominates at a few query rows:
at 16 sequences on a 2-core AVX-512 machine the two took a third to half of a decode step (docs/performance.md).
The kernel reads each key and value row where it lies. It is compiled once per machine with torch's C++ extension
builder (ninja and the C++ compiler torch was built for, into TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions by
default; about a minute), for the CPU it runs on. If it cannot be built, attention falls back to the SDPA path
and says so once in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode.cpp")
# -march=native: the build is for this machine's vector units (AVX-512 where there is one). -ffast-math at
# compile time only (not at link, where it would set flush-to-zero for the whole process): it lets the compiler
# vectorize the float32 dot products and sums; the kernel uses no infinities.
_CFLAGS = ["-O3", "-march=native", "-ffast-math"]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_key() -> str:
    """Part of the extension's name: a build cache shared by machines of different CPUs keeps one build each."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = os.uname().machine
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def kernel():
    """The compiled module (its `paged_decode_attention`), or None where it cannot be built or is turned off
    (SPECSERVE_PAGED_KERNEL=0). Built once per process, the first caller waits."""
    if "module" in _state:  # every layer of every step asks: no lock once built
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _build():
    if os.environ.get("SPECSERVE_PAGED_KERNEL", "1") == "0":
        log.info("paged decode kernel turned off (SPECSERVE_PAGED_KERNEL=0): attention uses the SDPA path")
        return None
    name = f"specserve_paged_decode_{_cpu_key()}"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if not any(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
            log.info("building the paged decode kernel for this machine (once; about a minute on 2 cores)")
        module = load(name=name, sources=[str(_SOURCE)], extra_cflags=_CFLAGS, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the SDPA path still serves
        log.warning("paged decode kernel not built (%s); attention uses the slower SDPA path",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        return None
    log.info("paged decode kernel ready")
    return module


def available() -> bool:
    return kernel() is not None


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_rows: torch.Tensor,
           q_offsets: torch.Tensor, slots: torch.Tensor, ctx_offsets: torch.Tensor, visible: torch.Tensor,
           scale: float, out: torch.Tensor) -> None:
    """Write the attention of the short queries into `out` [T, H, D]; the layout is paged_decode.cpp's."""
    kernel().paged_decode_attention(q, k_cache, v_cache, q_rows, q_offsets, slots, ctx_offsets, visible, scale, out)
