"""The rollout interface: :class:`RolloutBackend` samples completions of token-id prompts.

``RolloutBackend.generate(prompts, num_samples=, params=, seed=)`` returns one :class:`Completion` per
(prompt, sample), prompt-major: ``out[p * num_samples + s]``. ``to_sequence_specs`` turns the results
into packer inputs. Backends: :class:`mgrpo_fast.rl.rollout.hf.HFGenerateBackend` (transformers
``generate``) and :class:`mgrpo_fast.rl.rollout.vllm.VLLMBackend` (a colocated vLLM engine). The
semantics of ``finish_reason``, seeds and log-probs are in the hf module's docstring; the vLLM
module's docstring says where it differs. The helpers below (argument checks, EOS ids, stop-string
cuts) are shared by both backends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from mgrpo_fast.packing.microbatch import SequenceSpec

__all__ = [
    "Completion",
    "FinishReason",
    "RolloutBackend",
    "SamplingParams",
    "check_generate_args",
    "check_prompts",
    "finish_completions",
    "first_stop_length",
    "has_stop",
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


def check_generate_args(params: SamplingParams, num_samples: int, seed: int) -> None:
    """The checks every ``RolloutBackend.generate`` makes on its non-prompt arguments."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
    if not is_integer_value(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples: expected an integer >= 1, got {num_samples!r}")
    if not is_integer_value(seed):
        raise TypeError(f"seed: expected an int, got {seed!r}")


def check_prompts(
    prompts: Sequence[Sequence[int]], vocab_size: int, max_positions: int | None, max_new_tokens: int
) -> list[list[int]]:
    """``prompts`` as lists of int ids, each non-empty, inside ``[0, vocab_size)`` and short enough that
    ``len + max_new_tokens <= max_positions`` (None = no limit); a bad prompt raises naming its index."""
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)):
        raise TypeError(f"prompts: expected a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        is_ids = isinstance(p, Sequence) and not isinstance(p, (str, bytes))
        if not is_ids or not all(is_integer_value(t) for t in p):
            raise TypeError(f"prompts[{i}]: expected a list of int token ids, got {p!r:.80}")
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt (the first token needs a context)")
        bad = [int(t) for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if max_positions is not None and len(p) + max_new_tokens > max_positions:
            raise ValueError(
                f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
                f"model's max_position_embeddings={max_positions}; truncate or drop the prompt"
            )
        out.append([int(t) for t in p])
    return out


def has_stop(text: str, stops: Sequence[str]) -> bool:
    return any(s in text for s in stops)


def first_stop_length(ids: list[int], tokenizer: Any, stops: Sequence[str]) -> int | None:
    """Length of the shortest prefix of ``ids`` whose decoding (``skip_special_tokens=False``) contains a
    stop string (or ``None``). Binary search: a prefix's decoding is a prefix of a longer one's (up to a
    trailing partial character)."""
    contains = lambda k: has_stop(tokenizer.decode(ids[:k], skip_special_tokens=False), stops)
    if not ids or not contains(len(ids)):
        return None
    lo, hi = 0, len(ids)
    if not contains(hi - 1):  # the usual case: the last token completes it
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if contains(mid) else (mid, hi)
    return hi


def finish_completions(
    raw: Sequence[tuple[int, int, list[int], list[float] | None]],
    eos_token_ids: Sequence[int],
    tokenizer: Any,
    stops: Sequence[str],
) -> list[Completion]:
    """``Completion``s from ``(prompt_index, sample_index, sampled ids, log-probs or None)``: cut after the
    first EOS id (``"eos"``), else after the token completing the first stop string (``"stop"``), else
    ``"length"``; log-probs cut to the ids; ``text`` decoded without special tokens (hf module docstring)."""
    eos = set(eos_token_ids)
    results = []
    for p, s, ids, lps in raw:
        reason: FinishReason = "length"
        cut = next((i for i, t in enumerate(ids) if t in eos), None)
        if cut is not None:
            ids, reason = ids[: cut + 1], "eos"
        if stops:
            k = first_stop_length(ids, tokenizer, stops)
            if k is not None and not (reason == "eos" and k == len(ids)):
                ids, reason = ids[:k], "stop"
        results.append((p, s, list(ids), reason, None if lps is None else list(lps[: len(ids)])))
    texts = tokenizer.batch_decode([ids for _, _, ids, _, _ in results], skip_special_tokens=True)
    return [
        Completion(
            prompt_index=p, sample_index=s, token_ids=ids, text=text, finish_reason=reason, logprobs=lp
        )
        for (p, s, ids, reason, lp), text in zip(results, texts)
    ]
