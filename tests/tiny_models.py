"""Tiny seeded causal LMs with an offline byte-level tokenizer, for tests.

`make_tiny_model(path, arch=...)` writes a directory that loads like any Hugging Face model
(config.json + model.safetensors + tokenizer files with a chat template) in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe")  # served by the engine in the tests
# Mixture-of-Experts architectures of the expert-dispatch tests (DeepSeek-V3: MLA attention, group-limited routing,
# a dense first layer and shared experts).
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")

# Same special tokens (and ids 0, 1, 2) as SmolLM2, so code paths that look at bos/eos behave alike.
UNK, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [UNK, BOS, EOS]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fixed training text: the merges (and so the vocabulary) depend only on this string.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Once upon a time there was a small model that liked to count: one, two, three, four, five.",
    "def add(a, b):\n    return a + b\n",
    "user: what is 2 + 2?\nassistant: 2 + 2 = 4.",
    "Speculative decoding drafts tokens cheaply and verifies them in one forward pass.",
] * 4

_TOKENIZER_VOCAB = 384  # 256 byte symbols + 3 specials + ~125 merges


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process (deterministic, offline); any string round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def _config(arch: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast, num_layers: int = 2):
    known = ARCHS + tuple(a for a in MOE_ARCHS if a not in ARCHS)
    if arch not in known:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(known)}")
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # explicit: qwen3 defaults to 128
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        kw["sliding_window"] = None  # plain causal attention; the window would exceed 512 anyway
    elif arch == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    elif arch == "qwen2_moe":
        kw.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    elif arch == "qwen3_moe":
        kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                  mlp_only_layers=[], norm_topk_prob=True)
    elif arch == "olmoe":
        kw.update(num_experts=8, num_experts_per_tok=2, intermediate_size=32, pad_token_id=None)
    elif arch == "deepseek_v3":
        kw.update(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                  moe_intermediate_size=32, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
                  head_dim=8)  # its rotary embedding takes head_dim as the rope part
    return CONFIG_MAPPING[arch](**kw)


def make_tiny_model(path, arch: str = "llama", seed: int = 0, vocab_size: int | None = None,
                    num_layers: int = 2) -> Path:
    """Save a seeded tiny random causal LM plus tokenizer into `path`; returns the path."""
    path = Path(path)
    tokenizer = make_tokenizer()
    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = n_tokens
    elif vocab_size < n_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({n_tokens} tokens)")
    config = _config(arch, vocab_size, tokenizer, num_layers)
    # Fork the RNG so callers' global torch seed state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = None
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
