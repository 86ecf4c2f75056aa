"""A sequence being generated: its tokens, its place in the paged KV cache, its sampling state."""

from __future__ import annotations

import enum
import hashlib
import random
import time

import torch

from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.speculation import SpeculationStats


def choice_seed(seed: int, index: int) -> int:
    """The generator seed of choice `index` of a request seeded with `seed`: choice 0 uses the seed itself (as a
    request with n = 1 does), the others one derived from (seed, index), so each choice repeats on its own."""
    if index == 0:
        return seed % 2 ** 64
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 hash_root: bytes | None = None, index: int = 0):
        self.request_id = request_id
        self.index = index  # which of the request's n choices (see LLMEngine._fork)
        # Root of this sequence's block hashes: its tenant's namespace (None: the engine's own).
        self.hash_root = hash_root
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Tokens whose KV is in the cache. The next forward computes token_ids[num_computed_tokens:].
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at (last) admission, and how many of the prompt's tokens
        # had their blocks imported from the KV store for it.
        self.num_cached_tokens = 0
        self.num_imported_tokens = 0
        # Hashes of the full blocks registered in the prefix cache so far (chained).
        self.block_hashes: list[bytes] = []
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        # Per-request generator: a seeded request reproduces its samples whatever else is in the batch.
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(choice_seed(params.seed, index) if params.seed is not None
                                   else random.getrandbits(63))
        # Speculation: this step's draft (verified with the last committed token in one forward), the
        # acceptance estimate that sets k, per-request counters, and rounds since it last drafted.
        self.draft = None  # speculation.Draft | None
        self.acceptance = None  # speculation.AcceptanceEstimate, created on the first decode round
        self.spec_stats = SpeculationStats()
        self.rounds_without_draft = 0
        # The grammar's state after the committed tokens (structured.GrammarMatcher), when params.structured.
        self.grammar = None
        # Prompt logprobs being gathered, by position (None at 0), while the request asked for them and its first
        # output has not carried them yet; None otherwise. Only choice 0 carries them.
        self.prompt_logprobs: list | None = (
            [None] * self.num_prompt_tokens if params.prompt_logprobs is not None and index == 0 else None)

    @property
    def seq_id(self) -> str:
        """Unique per sequence (a request's choices share its request_id): the key of per-sequence state kept
        outside it, such as a proposer's."""
        return self.request_id if self.index == 0 else f"{self.request_id}#{self.index}"

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft.tokens) if self.draft is not None else 0

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
