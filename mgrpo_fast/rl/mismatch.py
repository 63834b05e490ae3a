"""The sampler–trainer mismatch: its metrics and the truncated importance-sampling (TIS) correction.

The rollout engine samples with its own kernels (vLLM: paged attention, its own GEMMs, possibly another
dtype), so the log-prob ``logp_s`` it reports for a sampled token differs slightly from the trainer's
``logp_t`` of the same token under the same weights. The update is then slightly off-policy. Per
completion token, with ``Δ = logp_t − logp_s`` (the formulas are in ``mgrpo_fast.reference``):

* metrics (``rollout/mismatch_*``): mean ``|Δ|``; the k3 estimate of KL(sampler ‖ trainer),
  mean ``exp(Δ) − 1 − Δ`` (≥ 0, unbiased on samples drawn by the sampler); the fraction of tokens
  whose ratio ``exp(Δ)`` exceeds the cap ``C``; the mean truncated weight;
* TIS (``rollout.is_correction: tis``): the policy term of each token's loss is multiplied by
  ``w = min(exp(Δ), C)`` (token level) or, at sequence level, by ``min(exp(Σ_seq Δ), C)`` for every token
  of the sequence; the loss takes it as ``vllm_is_ratio`` (``mgrpo_fast.ops``), the KL term is not
  scaled. The weight carries no gradient (``logp_t`` is the *old* policy's log-prob, the one the ratio of the
  GRPO surrogate divides by).

Sampler log-probs arrive per sequence (``TrainingBatch.old_logprobs``); :func:`microbatch_sampler_logprobs`
lays them out as the ``(L,)`` loss rows of a packed micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mgrpo_fast.packing.microbatch import PackedMicroBatch

__all__ = ["IS_LEVELS", "MismatchSums", "microbatch_sampler_logprobs", "truncated_is_weights"]

IS_LEVELS = ("token", "sequence")


def microbatch_sampler_logprobs(
    mb: PackedMicroBatch, per_sequence: Sequence[Sequence[float]]
) -> torch.Tensor:
    """``(L,)`` f32: the sampler's log-probs of the loss rows of ``mb`` (``per_sequence[s]``: the
    completion tokens of sequence ``s`` of the batch, indexed like ``mb.loss_seq``)."""
    seq = mb.loss_seq.cpu()
    if seq.numel() == 0:
        return torch.zeros(0, dtype=torch.float32)
    ids, counts = torch.unique_consecutive(seq, return_counts=True)
    parts = []
    for s, n in zip(ids.tolist(), counts.tolist()):
        lp = per_sequence[s]
        if len(lp) != n:
            raise ValueError(
                f"sampler log-probs of sequence {s}: {len(lp)} values for {n} completion tokens; the "
                "backend must return one log-prob per sampled token"
            )
        parts.append(torch.as_tensor(lp, dtype=torch.float32))
    return torch.cat(parts)


def truncated_is_weights(
    trainer_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    cap: float,
    level: str = "token",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(L,)`` f32 TIS weights ``min(exp(Δ), cap)`` per token (``level="token"``) or
    ``min(exp(Σ_seq Δ), cap)`` broadcast to the tokens of each sequence (``"sequence"``, needs
    ``cu_seqlens (S+1,)`` over the ``L`` rows); ``Δ = trainer_logp − sampler_logp``, no gradient."""
    if level not in IS_LEVELS:
        raise ValueError(f"level: expected one of {IS_LEVELS}, got {level!r}")
    if not cap > 0:
        raise ValueError(f"cap: expected a number > 0, got {cap!r}")
    if trainer_logp.shape != sampler_logp.shape or trainer_logp.dim() != 1:
        raise ValueError(
            f"trainer_logp {tuple(trainer_logp.shape)} and sampler_logp {tuple(sampler_logp.shape)}: "
            "expected two (L,) tensors"
        )
    delta = trainer_logp.detach().double() - sampler_logp.to(trainer_logp.device).double()
    if level == "sequence":
        if cu_seqlens is None:
            raise ValueError("cu_seqlens: required for level='sequence'")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64).to(delta.device)
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=delta.device), lengths)
        sums = torch.zeros(lengths.numel(), dtype=delta.dtype, device=delta.device).index_add_(0, seq, delta)
        delta = sums.index_select(0, seq)
    # clamp the log first: exp of a large Δ would overflow to inf before the min
    return torch.exp(torch.clamp(delta, max=float(torch.tensor(cap).log()))).float()


class MismatchSums:
    """Sums over the tokens of a step (all micro-batches) of the mismatch statistics; ``sums()`` /
    ``MetricSums.merge`` give token means over ranks (metric names in the module docstring)."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.total: dict[str, float] = {"abs": 0.0, "kl_k3": 0.0, "beyond_cap": 0.0, "is_weight": 0.0}
        self.tokens = 0.0

    def add(self, trainer_logp: torch.Tensor, sampler_logp: torch.Tensor) -> None:
        delta = trainer_logp.detach().double().cpu() - sampler_logp.double().cpu()
        ratio = torch.exp(delta)
        self.total["abs"] += float(delta.abs().sum())
        self.total["kl_k3"] += float((ratio - 1.0 - delta).sum())
        self.total["beyond_cap"] += float((ratio > self.cap).sum())
        self.total["is_weight"] += float(ratio.clamp(max=self.cap).sum())
        self.tokens += delta.numel()

    def sums(self) -> dict[str, tuple[float, float]]:
        """``{metric name: (Σ value, Σ tokens)}`` (what ``MetricSums.merge`` combines over ranks)."""
        names = {"abs": "mismatch_abs", "kl_k3": "mismatch_kl", "beyond_cap": "is_beyond_cap"}
        names["is_weight"] = "is_weight_mean"
        return {f"rollout/{names[k]}": (v, self.tokens) for k, v in self.total.items()}
