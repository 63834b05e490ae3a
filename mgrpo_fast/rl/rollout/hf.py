"""Rollouts on transformers ``generate``: :class:`HFGenerateBackend`.

``RolloutBackend.generate(prompts, num_samples=, params=, seed=)`` returns one :class:`Completion` per
(prompt, sample), prompt-major: ``out[p * num_samples + s]``. :class:`HFGenerateBackend` runs
transformers' ``generate`` with a KV cache on micro-batches of ``params.batch_size`` prompts x
``num_samples`` rows, left-padded only inside the call (``attention_mask`` marks the padding and the
positions come from it). ``to_sequence_specs`` turns the results into packer inputs.

Completions. ``token_ids`` are the sampled ids (no padding added), and ``text`` is exactly
``tokenizer.decode(token_ids, skip_special_tokens=True)``. ``finish_reason``:

* ``"eos"``: the last token is an EOS id (kept, so the policy learns to stop; nothing after it);
* ``"stop"``: cut right after the token that completes the first stop string: the shortest prefix
  whose decoding (``skip_special_tokens=False``) contains a stop string. That token may carry
  characters past the stop string; they stay (ids and text must agree). The stop string is kept;
* ``"length"``: ``max_new_tokens`` tokens without either.

Sampling (``temperature > 0``). Logits (fp32, as ``generate`` hands them over) go through
``logits / temperature``, then top-k, then top-p (transformers' own warpers, in that order), and one
token is drawn by inverse CDF with a uniform number ``u(seed, p, s, t)`` from a counter-based hash
(SplitMix64) of the seed, the prompt's index ``p`` in ``prompts``, the sample index ``s`` and the
step ``t``. ``temperature == 0`` is greedy (argmax, first index on ties).

Determinism. The random numbers of completion ``(p, s)`` depend only on ``(seed, p, s, t)``: not on
``batch_size``, on the other rows of its micro-batch, or on torch's global RNG (never read or
changed). Hence (1) same prompts, params, seed, ``batch_size``, device and software give identical
completions and log-probs (bitwise, as far as the model forward itself is deterministic: always on
CPU); (2) a different ``batch_size`` gives the same random draws, so the same completions up to the
floating-point differences the batch shape and padding cause in the forward (identical on CPU
fp32 in the tests; a near-tie could flip in bf16 on GPU). Use a fresh seed per rollout batch.

Log-probs (``return_logprobs``). Per completion token, ``log_softmax(warped)[token]`` in fp32, where
``warped`` is the distribution the token was drawn from: ``logits / temperature`` with top-k/top-p
filtered tokens at ``-inf``. With ``top_k=0, top_p=1`` that is ``log_softmax(logits / T)``, the
training log-prob at temperature ``T`` (``packed_logprobs(..., temperature=T)``), so they can serve
as old log-probs. Greedy (``temperature=0``): ``log_softmax(logits)`` of the chosen token
(temperature 1, unfiltered). With a bf16/fp16 model the logits are rounded to that dtype by the
``lm_head`` before the fp32 cast, whereas ``linear_logprobs`` keeps fp32 logits: recompute old
log-probs with ``packed_logprobs`` where that difference matters.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mgrpo_fast.models.checkpoints import stop_token_ids
from mgrpo_fast.rl.rollout.base import (
    Completion,
    SamplingParams,
    check_generate_args,
    check_prompts,
    finish_completions,
    has_stop,
)

logger = logging.getLogger(__name__)

__all__ = ["CACHE_FREE_ATTENTION", "HFGenerateBackend"]

CACHE_FREE_ATTENTION = ("mgrpo_packed",)  # training-only attentions that refuse a KV cache


# ------------------------------------------------------------------------------------------------
# Counter-based random numbers: u(seed, p, s, t) in [0, 1)
# ------------------------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64, as intended
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _row_keys(seed: int, prompt_idx: Sequence[int], sample_idx: Sequence[int]) -> np.ndarray:
    base = _splitmix64(np.full(len(prompt_idx), seed % 2**64, dtype=np.uint64))
    with np.errstate(over="ignore"):
        k = _splitmix64(base + np.asarray(prompt_idx, dtype=np.uint64))
        return _splitmix64(k + np.asarray(sample_idx, dtype=np.uint64))


def _uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        bits = _splitmix64(keys + np.uint64(step)) >> np.uint64(11)  # 53 random bits
    return bits.astype(np.float64) * 2.0**-53


def _inverse_cdf(warped: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(B,)`` token ids drawn from ``softmax(warped)`` (``(B, V)``, ``-inf`` = filtered) with ``u``."""
    probs = torch.softmax(warped, dim=-1)
    cdf = probs.double().cumsum(dim=-1)  # fp64: no visible drift over a 150k vocabulary
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=warped.shape[-1] - 1)
    # u * total can round up to total; a filtered (zero-probability) token is never returned
    ok = probs.gather(1, idx[:, None]).squeeze(1) > 0
    return torch.where(ok, idx, probs.argmax(dim=-1))


# ------------------------------------------------------------------------------------------------
# transformers hooks (imported lazily: the interface above needs no transformers)
# ------------------------------------------------------------------------------------------------
@functools.cache
def _hooks():
    import transformers as tf

    class Sampler(tf.LogitsProcessor):
        """Picks each row's token itself (seeded per row and step) and returns a one-hot score, so the
        greedy ``generate`` loop appends exactly that token; records the chosen token's log-prob."""

        def __init__(self, params: SamplingParams, keys: np.ndarray, width: int) -> None:
            self.params, self.keys, self.width = params, keys, width
            warpers = []
            if not params.greedy:
                if params.temperature != 1.0:
                    warpers.append(tf.TemperatureLogitsWarper(float(params.temperature)))
                if params.top_k > 0:
                    warpers.append(tf.TopKLogitsWarper(top_k=int(params.top_k)))
                if params.top_p < 1.0:
                    warpers.append(tf.TopPLogitsWarper(top_p=float(params.top_p)))
            self.warpers = tf.LogitsProcessorList(warpers)
            self.logprobs: list[torch.Tensor] = []

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if self.params.greedy:
                warped, chosen = scores, scores.argmax(dim=-1)
            else:
                warped = self.warpers(input_ids, scores)
                u = torch.from_numpy(_uniforms(self.keys, input_ids.shape[1] - self.width))
                chosen = _inverse_cdf(warped, u.to(scores.device))
            if self.params.return_logprobs:
                self.logprobs.append(torch.log_softmax(warped, dim=-1).gather(1, chosen[:, None]).squeeze(1))
            return torch.full_like(scores, -math.inf).scatter_(1, chosen[:, None], 0.0)

    class StopStrings(tf.StoppingCriteria):
        """Ends a row once the decoding of its completion contains a stop string. Each step decodes
        only a window of the last tokens, confirmed on the whole completion; a window too short to
        see a stop string only delays stopping (the cut is computed exactly afterwards)."""

        def __init__(self, tokenizer: Any, stops: tuple[str, ...], width: int, rows: int) -> None:
            self.tokenizer, self.stops, self.width = tokenizer, stops, width
            self.window = max(len(s) for s in stops) + 8  # tokens
            self.stopped_at: list[int | None] = [None] * rows  # completion length when stopped

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            n = input_ids.shape[1] - self.width
            tails = self.tokenizer.batch_decode(
                input_ids[:, max(self.width, input_ids.shape[1] - self.window) :].tolist(),
                skip_special_tokens=False,
            )
            for r, tail in enumerate(tails):
                if self.stopped_at[r] is None and has_stop(tail, self.stops):
                    full = input_ids[r, self.width :].tolist()
                    if has_stop(self.tokenizer.decode(full, skip_special_tokens=False), self.stops):
                        self.stopped_at[r] = n
            done = [s is not None for s in self.stopped_at]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return Sampler, StopStrings


class HFGenerateBackend:
    """Rollouts with transformers' ``generate`` (KV cache) on a causal LM.

    Args:
        model: a transformers causal LM (e.g. from ``mgrpo_fast.models.policy.load_policy``).
        tokenizer: its tokenizer (decoding and stop strings).
        eos_token_ids: the ids that end a completion; default: every stop token of the model
            (``mgrpo_fast.models.checkpoints.stop_token_ids``: the tokenizer's EOS, the
            ``generation_config``/``config`` EOS ids, the chat template's end-of-turn token).
        pad_token_id: fills the left padding; default the tokenizer's pad token, else the first EOS.
        attn_implementation: the attention used while generating: ``"auto"`` keeps the model's,
            unless it is the training-only ``"mgrpo_packed"`` (no KV cache), then ``"sdpa"``; or any
            cache-capable transformers name (``"sdpa"``, ``"flash_attention_2"``, ``"eager"``).

    During ``generate`` the model is in eval mode under ``torch.no_grad()``, with that attention and a
    neutral generation config (the checkpoint's ``generation_config.json`` sampling defaults, e.g.
    Qwen's ``top_k=20, repetition_penalty=1.05``, never apply: only ``SamplingParams`` do); the
    training mode, attention implementation and generation config are restored afterwards.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        eos_token_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        attn_implementation: str = "auto",
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        if eos_token_ids is None:
            eos_token_ids = stop_token_ids(model, tokenizer)
        self.eos_token_ids = list(dict.fromkeys(int(t) for t in eos_token_ids))
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            if pad_token_id is None and self.eos_token_ids:
                pad_token_id = self.eos_token_ids[0]
        if pad_token_id is None:
            raise ValueError("pad_token_id: the tokenizer has no pad and no EOS token; pass pad_token_id=")
        self.pad_token_id = int(pad_token_id)
        self.attn_implementation = attn_implementation
        emb = model.get_input_embeddings()
        self.vocab_size = int(getattr(emb, "num_embeddings", model.config.vocab_size))
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def generate(
        self, prompts: list[list[int]], *, num_samples: int, params: SamplingParams, seed: int
    ) -> list[Completion]:
        """``len(prompts) * num_samples`` completions, prompt-major (``out[p * num_samples + s]``)."""
        check_generate_args(params, num_samples, seed)
        prompts = check_prompts(prompts, self.vocab_size, self.max_positions, params.max_new_tokens)
        from transformers import GenerationConfig

        model = self.model
        was_training = model.training
        old_attn = model.config._attn_implementation
        old_gen_config = model.generation_config
        attn = self.attn_implementation
        if attn == "auto":
            attn = "sdpa" if old_attn in CACHE_FREE_ATTENTION else old_attn
        out: list[Completion] = []
        try:
            model.eval()
            if attn != old_attn:
                model.set_attn_implementation(attn)
            model.generation_config = GenerationConfig()  # no checkpoint defaults leak in
            with torch.no_grad():
                for start in range(0, len(prompts), params.batch_size):
                    chunk = range(start, min(start + params.batch_size, len(prompts)))
                    out += self._generate_chunk(prompts, chunk, num_samples, params, int(seed))
        finally:
            model.generation_config = old_gen_config
            if model.config._attn_implementation != old_attn:
                model.set_attn_implementation(old_attn)
            model.train(was_training)
        return out

    def _generate_chunk(self, prompts, chunk, num_samples, params, seed) -> list[Completion]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        Sampler, StopStrings = _hooks()
        rows = [(p, s) for p in chunk for s in range(num_samples)]
        width = max(len(prompts[p]) for p in chunk)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (p, _) in enumerate(rows):  # left padding
            input_ids[r, width - len(prompts[p]) :] = torch.tensor(prompts[p])
            mask[r, width - len(prompts[p]) :] = 1
        sampler = Sampler(params, _row_keys(seed, [p for p, _ in rows], [s for _, s in rows]), width)
        stopper = StopStrings(self.tokenizer, params.stop, width, len(rows)) if params.stop else None
        config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=params.max_new_tokens, use_cache=True,
            eos_token_id=self.eos_token_ids or None, pad_token_id=self.pad_token_id,
        )  # fmt: skip
        sequences = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([stopper] if stopper else []),
            # transformers turns synced_gpus on by itself under FSDP / ZeRO-3 (an all-reduce per token,
            # so ranks that generate different lengths would deadlock); the engines give generate the
            # full parameters, so each rank generates alone.
            synced_gpus=False,
        )  # fmt: skip
        generated = sequences[:, width:].tolist()
        logprobs = None
        if params.return_logprobs:
            logprobs = torch.stack(sampler.logprobs, dim=1).float().cpu().tolist()
        raw = []
        for r, (p, s) in enumerate(rows):
            ids = generated[r]
            if stopper is not None and stopper.stopped_at[r] is not None:
                ids = ids[: stopper.stopped_at[r]]  # what follows is padding
            raw.append((p, s, ids, None if logprobs is None else logprobs[r]))
        return finish_completions(raw, self.eos_token_ids, self.tokenizer, params.stop)
