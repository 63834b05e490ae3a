"""The rollout interface: :class:`RolloutBackend` samples completions of token-id prompts.

``RolloutBackend.generate(prompts, num_samples=, params=, seed=)`` returns one :class:`Completion` per
(prompt, sample), prompt-major: ``out[p * num_samples + s]``. ``to_sequence_specs`` turns the results
into packer inputs. Backends: :class:`mgrpo_fast.rl.rollout.hf.HFGenerateBackend` (transformers
``generate``). The semantics of ``finish_reason``, seeds and log-probs are in that module's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from mgrpo_fast.packing.microbatch import SequenceSpec

__all__ = [
    "Completion",
    "FinishReason",
    "RolloutBackend",
    "SamplingParams",
    "is_integer_value",
    "to_sequence_specs",
]

FinishReason = Literal["stop", "length", "eos"]


def is_integer_value(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample. Every field is checked; a bad value raises an error naming it.

    Attributes:
        temperature: softmax temperature, ``>= 0``; ``0`` is greedy decoding.
        top_p: nucleus sampling, ``0 < top_p <= 1`` (1 = off).
        top_k: keep the ``top_k`` most likely tokens, ``>= 0`` (0 = off).
        max_new_tokens: the most tokens a completion may have, ``>= 1``.
        stop: stop strings (a single string is one stop string); see the module docstring.
        return_logprobs: also return the sampling log-prob of every completion token.
        batch_size: prompts per ``generate`` call (each with all its ``num_samples`` rows), ``>= 1``.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    stop: Sequence[str] = ()
    return_logprobs: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}: expected {expected}, got {getattr(self, name)!r}")

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad("temperature", "a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise bad("top_p", "a number in (0, 1] (1 = off)")
        if not is_integer_value(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 = off)")
        if not is_integer_value(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not is_integer_value(self.batch_size) or self.batch_size < 1:
            raise bad("batch_size", "an integer >= 1 (prompts per generate call)")
        if not isinstance(self.return_logprobs, bool):
            raise bad("return_logprobs", "a bool")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "a sequence of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One sampled completion of ``prompts[prompt_index]`` (see the module docstring)."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float] | None = None


@runtime_checkable
class RolloutBackend(Protocol):
    """Anything that samples completions of token-id prompts."""

    def generate(
        self, prompts: list[list[int]], *, num_samples: int, params: SamplingParams, seed: int
    ) -> list[Completion]:
        """``len(prompts) * num_samples`` completions, ``out[p * num_samples + s]``."""
        ...


def to_sequence_specs(
    prompts: Sequence[Sequence[int]], completions: Sequence[Completion]
) -> list[SequenceSpec]:
    """One ``SequenceSpec(prompt, completion)`` per completion, in the same order."""
    return [SequenceSpec(list(prompts[c.prompt_index]), list(c.token_ids)) for c in completions]
