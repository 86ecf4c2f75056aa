"""bench-engine runs its closed loop end to end on a tiny real model and reports what it promises."""

import json

import pytest

from specserve.tools import bench_engine
from tiny_models import make_tiny_model


def test_bench_engine_compares_configurations_on_a_tiny_model(tmp_path):
    model = make_tiny_model(tmp_path / "model", arch="llama", seed=5)
    out, text = tmp_path / "engine.json", tmp_path / "engine.txt"
    assert bench_engine.main(["--model", str(model), "--dtype", "float32", "--threads", "1", "--concurrency", "3",
                              "--num-requests", "5", "--max-tokens", "6", "--warmup", "1", "--rounds", "2",
                              "--variant", "ngram=speculative.method=ngram,engine.kv_cache_memory_gb=0.01",
                              "--variant", "none=speculative.method=none,engine.kv_cache_memory_gb=0.01",
                              "--json", str(out), "--text", str(text)]) == 0
    report = json.loads(out.read_text())
    assert report["concurrency"] == 3 and report["requests"] == 5 and report["prompt_tokens_mean"] > 0
    assert list(report["passes"]) == ["ngram", "none"] and all(len(p) == 2 for p in report["passes"].values())
    for label, passes in report["passes"].items():
        for p in passes:
            # Every request ran to its end: 6 tokens each unless the random model sampled an EOS first.
            assert 5 <= p["output_tokens"] <= 5 * 6 and p["steps"] > 0 and p["seconds"] > 0
            assert 0 < p["mean_requests"] <= 3
            # The warm-up's rounds are not counted in the measured pass.
            assert p["accepted_tokens"] <= p["draft_tokens"]
            if label == "none":
                assert p["draft_tokens"] == 0 and p["spec_rounds"] == 0 and p["gate"] is None
            else:  # speculative.gate (default on) reports what it measured, by batch size
                assert p["gate"] and any(b["drafting_steps"] + b["plain_steps"] > 0 for b in p["gate"].values())
    # Greedy and the same prompts: every pass of a variant produced the same tokens.
    assert len({p["output_tokens"] for ps in report["passes"].values() for p in ps}) == 1
    lines = text.read_text().splitlines()
    assert "the engine alone, chat workload, 5 requests" in lines[0]
    assert lines[1].startswith("ngram: ") and lines[2].startswith("none: ") and "x ngram)" in lines[2]
    assert "tok/s drafting/plain (steps) by batch size" in lines[1] and "gate" not in lines[2]
    assert report["median_tok_s"]["none"] > 0


@pytest.mark.parametrize("variant, message", [
    ("x=model.dtype=float32", "not an engine.* or speculative.* key"),
    ("=speculative.method=none", "expected LABEL="),
])
def test_bench_engine_refuses_variants_it_cannot_run(variant, message, capsys):
    with pytest.raises(SystemExit):
        bench_engine.parse_args(["--variant", variant])
    assert message in capsys.readouterr().err


def test_bench_engine_refuses_drafts_from_drafter_replicas(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "model", arch="llama", seed=5)
    assert bench_engine.main(["--model", str(model), "--dtype", "float32", "--threads", "1", "--concurrency", "1",
                              "--num-requests", "1", "--max-tokens", "2", "--rounds", "1",
                              "--variant", "remote=speculative.method=suffix,speculative.suffix_in=drafter"]) == 2
    assert "drafts in drafter replicas" in capsys.readouterr().err
