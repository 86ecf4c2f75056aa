"""Whether to draft at all at the current batch size: measured, not modelled.

The controller picks k per sequence from modelled acceptance and a fitted step-cost line. Both can be wrong in
ways only the step times show: on a 2-core CPU a draft row at 16 sequences costs about as much as a sequence's
share of the step, so fresh chat drafts accepted a third of the time lose, while at one sequence the same drafts
are nearly free. The gate runs windows of steps with drafting on and off, separately for each batch size
(powers of two), and keeps the arm that commits more tokens per second of step time, still giving the other
arm one window in `explore_every` so that it notices when traffic changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ArmRecord:
    """Discounted tokens committed and seconds spent over the steps run with one arm."""
    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    def add(self, tokens: int, seconds: float, decay: float) -> None:
        self.tokens = decay * self.tokens + tokens
        self.seconds = decay * self.seconds + seconds
        self.steps += 1

    @property
    def tok_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


@dataclass
class BucketState:
    """One batch-size bucket: each arm's record and the window in progress."""
    off: ArmRecord = field(default_factory=ArmRecord)
    on: ArmRecord = field(default_factory=ArmRecord)
    drafting: bool = True  # the arm of the window in progress
    steps_left: int = 0  # of that window
    windows: int = 0

    def record(self, drafting: bool) -> ArmRecord:
        return self.on if drafting else self.off


class SpeculationGate:
    """`drafting(n)` before a step with n decoding sequences says whether it drafts; `observe(n, drafting,
    tokens, seconds)` after a step of those n decodes only (prefill chunks and preemptions would blur the
    comparison) records what that arm committed and how long the step took, drafting and scheduling included.
    The arm that is not kept is measured one window in `explore_every`, so its record is older."""

    def __init__(self, window: int = 8, explore_every: int = 8, min_steps: int = 16, decay: float = 0.98):
        if window < 2 or explore_every < 2 or min_steps < 1 or not 0 < decay <= 1:
            raise ValueError("window >= 2, explore_every >= 2, min_steps >= 1 and 0 < decay <= 1")
        self.window = window
        self.explore_every = explore_every
        self.min_steps = min_steps  # counted steps each arm needs in a bucket before either is preferred
        self.decay = decay  # per counted step of an arm: about the last 50 count
        self.buckets: dict[int, BucketState] = {}

    @staticmethod
    def bucket(num_decoding: int) -> int:
        """1, 2-3, 4-7, 8-15, 16-31, ... sequences: step cost per row changes slowly within each."""
        return max(num_decoding, 1).bit_length()

    def drafting(self, num_decoding: int) -> bool:
        state = self.buckets.setdefault(self.bucket(num_decoding), BucketState())
        if state.steps_left == 0:
            state.drafting = self._next_arm(state)
            state.steps_left = self.window
            state.windows += 1
        state.steps_left -= 1
        return state.drafting

    def _next_arm(self, state: BucketState) -> bool:
        if state.on.steps < self.min_steps or state.off.steps < self.min_steps:
            return state.on.steps <= state.off.steps  # learning: the arm with fewer steps, drafting first
        best = state.on.tok_s >= state.off.tok_s
        explore = (state.windows + 1) % self.explore_every == 0
        return best != explore

    def observe(self, num_decoding: int, drafting: bool, tokens: int, seconds: float) -> None:
        state = self.buckets.get(self.bucket(num_decoding))
        if state is None or seconds <= 0:
            return
        if state.steps_left == self.window - 1:
            # The window's first step pays for the switch (a drafter replica catching up on every token since
            # it last drafted, the suffix trees' pending updates): not what the arm costs a step.
            return
        state.record(drafting).add(tokens, seconds, self.decay)

    def as_dict(self) -> dict:
        """Per bucket (its smallest batch size): each arm's tokens per second (discounted) and the steps counted
        for it since the gate started."""
        return {str(1 << (b - 1)): {"drafting_tok_s": s.on.tok_s, "plain_tok_s": s.off.tok_s,
                                    "drafting_steps": s.on.steps, "plain_steps": s.off.steps}
                for b, s in sorted(list(self.buckets.items()))}  # a copy: the metrics thread reads it too
