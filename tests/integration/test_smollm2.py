"""The real default model, SmolLM2-135M-Instruct, through the full HTTP path."""

import asyncio
import os

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from served_apps import start_app
from specserve.actors.model_loader import pull_model
from specserve.cluster.config import default_cache_dir

pytestmark = [pytest.mark.integration, pytest.mark.smollm2]
NAME = "smollm2-135m"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused.",
    "Explain what a GPU is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Name a famous painting by Leonardo da Vinci.",
    "Summarize: The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def smollm2(ray_cluster):
    path = pull_model(NAME, os.environ.get("SPECSERVE_CACHE") or default_cache_dir(), progress=False)
    server = start_app(ray_cluster, NAME, NAME, **{"model.cache_dir": str(path.parent.parent)})
    yield server, path
    server.stop()


def test_greedy_chat_is_token_identical_to_hf_generate_float32(smollm2):
    server, path = smollm2
    max_tokens = 24

    async def one(client, content):
        r = await client.post(f"{server.url}/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[one(client, p) for p in PROMPTS])

    choices = asyncio.run(run())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for content, choice in zip(PROMPTS, choices):
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        expected = out[0, len(ids):].tolist()
        assert choice["token_ids"] == expected, content
        assert choice["message"]["content"] == tok.decode(expected, skip_special_tokens=True)
    paris = choices[0]["message"]["content"]
    assert "Paris" in paris
