"""A sequence being generated: its tokens, its place in the paged KV cache, its sampling state."""

from __future__ import annotations

import enum
import random
import time

import torch

from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.speculation import SpeculationStats


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 hash_root: bytes | None = None):
        self.request_id = request_id
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
        self.generator.manual_seed(params.seed % 2 ** 64 if params.seed is not None else random.getrandbits(63))
        # Speculation: this step's draft (verified with the last committed token in one forward), the
        # acceptance estimate that sets k, per-request counters, and rounds since it last drafted.
        self.draft = None  # speculation.Draft | None
        self.acceptance = None  # speculation.AcceptanceEstimate, created on the first decode round
        self.spec_stats = SpeculationStats()
        self.rounds_without_draft = 0

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
