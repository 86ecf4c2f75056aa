"""The pure parts of `specserve bench-structured`: its records satisfy its schema (as jsonschema and the grammar
engine see it), and the step summary."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from specserve.actors.engine.sampling_params import StructuredOutput
from specserve.actors.engine.structured import GrammarCompiler, check_structured
from specserve.tools.bench_structured import (
    SCHEMA,
    format_masks,
    sample_record,
    summarize_steps,
)
from transformers import AutoTokenizer

MODEL = "/root/.cache/specserve/models/smollm2-135m"


def test_sampled_records_satisfy_the_schema_and_its_grammar():
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    check_structured(spec)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    compiler = GrammarCompiler(tokenizer, len(tokenizer))
    rng = random.Random(0)
    for _ in range(20):
        record = sample_record(rng)
        jsonschema.validate(record, SCHEMA)
        walk = tokenizer.encode(json.dumps(record)) + [tokenizer.eos_token_id]
        matcher = compiler.matcher(spec)
        assert matcher.valid_prefix(walk) == len(walk), json.dumps(record)
        matcher.accept(walk)
        assert matcher.done


def test_summarize_steps():
    summary = summarize_steps([0.001, 0.002, 0.003, 0.004, 0.010], rows_per_step=4)
    assert summary["steps"] == 5
    assert summary["step_ms_p50"] == pytest.approx(3.0)
    assert summary["step_ms_p90"] == pytest.approx(10.0)
    assert summary["step_ms_mean"] == pytest.approx(4.0)
    assert summary["us_per_row"] == pytest.approx(1000.0)
    table = format_masks({"tokenizer_setup_ms": 900.0, "compile_ms_p50": 0.5, "threads": None,
                          "rows": [{"concurrency": 16, "draft": 4, "mode": "worker", **summary}]})
    assert "  16     4 worker      5" in table
