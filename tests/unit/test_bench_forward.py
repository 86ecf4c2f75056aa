"""bench-forward runs end to end on a tiny real model and reports every figure it promises."""

import json

from specserve.actors.engine import cpu_kernels
from specserve.tools import bench_forward
from tiny_models import make_tiny_model


def test_bench_forward_on_a_tiny_model(tmp_path):
    model = make_tiny_model(tmp_path / "model", arch="llama", seed=5)
    out = tmp_path / "forward.json"
    text = tmp_path / "forward.txt"
    assert bench_forward.main(["--model", str(model), "--dtype", "float32", "--threads", "1", "--prompt-tokens", "12",
                               "--decode-tokens", "4", "--rounds", "2", "--batch-sizes", "1,3",
                               "--prefill-tokens", "24", "--draft-tokens", "2", "--kv-cache-gb", "0.01",
                               "--json", str(out),
                               "--text", str(text)]) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and report["threads"] == 1 and report["prompt_tokens"] == 12
    assert report["bare_ms_per_token"] > 0 and report["engine_ms_per_token"] > 0
    assert report["decode_ratio"] == report["engine_ms_per_token"] / report["bare_ms_per_token"]
    assert set(report["batch_steps"]) == {"1", "3"} and min(report["batch_steps"].values()) > 0
    assert report["prefill_tokens"] == 24 and report["bare_prefill_ms"] > 0 and report["engine_prefill_ms"] > 0
    # The floors: the model's own linears at each batch size, and its linear weights read once.
    assert report["stream_gb_s"] > 0 and report["weight_mb"] > 0 and set(report["linears_ms"]) == {"1", "3"}
    assert min(report["linears_ms"].values()) > 0
    # Verification at the largest batch size: 3 sequences, each verifying 2 draft tokens a step.
    assert report["verify_batch"] == 3 and set(report["verify_steps"]) == {"2"} and report["verify_steps"]["2"] > 0
    # Every round verified 2 draft tokens but the last ones of each sequence, cut to the tokens it had left.
    assert set(report["verify_drafted"]) == {"2"} and 1.5 < report["verify_drafted"]["2"] <= 2.0
    # The attention paths at the largest batch size, where the kernel builds.
    assert report["paged_kernel"] == cpu_kernels.available()
    if report["paged_kernel"]:
        assert report["attention_batch"] == 3 and report["kernel_step_ms"] > 0 and report["sdpa_step_ms"] > 0
    # The layer paths likewise (a Llama model: DecoderForward wherever the kernels build).
    assert report["fused_layers"] == cpu_kernels.available()
    if report["fused_layers"]:
        assert report["layers_batch"] == 3 and report["fused_step_ms"] > 0 and report["eager_step_ms"] > 0
    lines = text.read_text().splitlines()
    assert "single-stream decode" in lines[1] and len([x for x in lines if "engine decode step" in x]) == 2
    assert len([x for x in lines if "the linears alone" in x]) == 2 and any(x.startswith("floors:") for x in lines)
    assert any(x.startswith("engine verify step,   3 sequences x (1 + 2 draft tokens)") for x in lines)
    assert lines[-1].startswith("prefill of 24 tokens")
    assert any(x.startswith("decode step,   3 sequences, attention through the paged kernel") for x in lines) == \
        report["paged_kernel"]
    assert any(x.startswith("decode step,   3 sequences, layers as DecoderForward") for x in lines) == \
        report["fused_layers"]
