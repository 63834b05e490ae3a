"""The GRPO objective on flat rows with torch autograd: the torch path of both loss ops, and the
pieces the Triton glue shares with it (the batch layout, the reduction weights, the metrics).

Both public layouts become flat rows here: padded token tensors ``(B, T)`` are read row-major as
``N = B * T`` rows, packed ones ``(N,)`` are already flat; a ``SequenceLayout`` maps rows to
sequences. The formulas of every loss type are in ``reference.grpo_loss_ref`` (the executable spec).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mgrpo_fast.ops.layout import SequenceLayout
from mgrpo_fast.ops.options import LossOptions
from mgrpo_fast.ops.validation import (
    check_finite,
    check_float,
    check_same_device,
    check_shape,
    check_tensor,
)


@dataclass(frozen=True)
class FlatBatch:
    """A validated batch in flat-row form (``N`` rows, ``S`` sequences).

    Attributes:
        layout: rows -> sequences.
        mask: ``(N,)`` float, the loss weight of each row (0 = no loss).
        advantages: ``(S,)`` per sequence (``advantages_per_seq``) or ``(N,)`` per row.
        token_weight: optional caller-given reduction weights ``(N,)`` (see :func:`token_weights`).
        old_logp, ref_logp: optional ``(N,)`` log-probs of the sampling and the reference policy.
    """

    layout: SequenceLayout
    mask: torch.Tensor
    advantages: torch.Tensor
    advantages_per_seq: bool
    token_weight: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    def row_advantages(self) -> torch.Tensor:
        """``(N,)``: the advantage of every row."""
        return self.layout.per_token(self.advantages) if self.advantages_per_seq else self.advantages


def flatten_batch(
    tokens: Mapping[str, torch.Tensor | None],
    options: LossOptions,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    token_weight: torch.Tensor | None = None,
) -> FlatBatch:
    """Validate a batch and flatten it.

    ``tokens``: the caller's token-shaped tensors by argument name. The first (``logp`` or
    ``targets``, checked by the caller) sets the shape ``(B, T)`` / ``(N,)`` and the device; the
    others are optional float tensors shaped like it (``old_logp``, ``ref_logp``, ``entropy``);
    ``ref_logp`` is required when ``options.beta != 0``.
    """
    (token_name, first), *others = tokens.items()
    token_shape, device = first.shape, first.device
    check_float("advantages", advantages)
    check_finite("advantages", advantages)
    here = torch.empty(0, device=device)
    if cu_seqlens is None:
        if len(token_shape) != 2:
            raise ValueError(
                f"{token_name}: expected (B, T) for the padded layout (or pass cu_seqlens for the "
                f"packed layout (N,)), got shape {tuple(token_shape)}"
            )
        batch, length = token_shape
        layout = SequenceLayout.padded(batch, length, device)
        per_seq_shape, seq_symbols = (batch,), "(B,)"
    else:
        check_tensor("cu_seqlens", cu_seqlens)
        if len(token_shape) != 1:
            raise ValueError(
                f"{token_name}: expected (N,) for the packed layout (cu_seqlens given), "
                f"got shape {tuple(token_shape)}"
            )
        check_same_device(token_name, here, cu_seqlens=cu_seqlens)
        layout = SequenceLayout.packed(cu_seqlens, token_shape[0])
        per_seq_shape, seq_symbols = (layout.num_seqs,), "(S,)"

    check_same_device(token_name, here, advantages=advantages, mask=mask)
    # Per sequence first: when every packed sequence has one token (S == N) both readings give the
    # same loss, and per sequence keeps the GSPO metrics sequence means.
    if tuple(advantages.shape) == per_seq_shape:
        adv, per_seq = advantages, True
    elif tuple(advantages.shape) == tuple(token_shape):
        adv, per_seq = advantages.reshape(-1), False
    else:
        raise ValueError(
            f"advantages: expected {seq_symbols} = {per_seq_shape} per sequence or {tuple(token_shape)} "
            f"per token, got {tuple(advantages.shape)}"
        )
    if mask is None:
        flat_mask = torch.ones(layout.num_tokens, device=device)
    else:
        check_tensor("mask", mask)
        check_shape("mask", mask, token_shape, "like the token tensors")
        flat_mask = mask.reshape(-1).to(torch.float32 if not mask.is_floating_point() else mask.dtype)
        check_finite("mask", flat_mask)
    if token_weight is not None:
        check_float("token_weight", token_weight)
        check_shape("token_weight", token_weight, token_shape, "like the token tensors")
        check_same_device(token_name, here, token_weight=token_weight)
        check_finite("token_weight", token_weight)
        low = float(token_weight.min()) if token_weight.numel() else 0.0
        if low < 0:
            raise ValueError(f"token_weight: expected weights >= 0, got a minimum of {low}")
        token_weight = token_weight.reshape(-1)
    for name, t in others:
        if t is not None:
            check_float(name, t)
            check_shape(name, t, token_shape, "like the token tensors")
            check_same_device("the token tensors", here, **{name: t})
    if options.beta != 0.0 and tokens.get("ref_logp") is None:
        raise ValueError(f"ref_logp: required when beta != 0 (beta={options.beta}); pass reference log-probs")
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    return FlatBatch(
        layout,
        flat_mask,
        adv,
        per_seq,
        token_weight,
        old_logp=flat(tokens.get("old_logp")),
        ref_logp=flat(tokens.get("ref_logp")),
    )


def token_weights(batch: FlatBatch, options: LossOptions, dtype: torch.dtype) -> torch.Tensor:
    """``(N,)`` weight of each row so that ``loss = Σ_rows weight · mask · ℓ`` for every loss type.

    * ``dapo``, ``bnpo``, ``cispo``: ``1 / max(1, M)`` (``M`` = mask sum of the batch);
    * ``grpo``: ``1 / (S · max(1, M_i))`` for a row of sequence ``i`` (token mean, then sequence mean);
    * ``dr_grpo``: ``1 / (S · L)``;
    * given ``batch.token_weight``: that, whatever the loss type. A trainer that splits one batch into
      micro-batches (and ranks) passes the weights of the *whole* batch, so the micro-batch losses sum
      to the loss of the whole batch (``mgrpo_fast.rl.update.global_sequence_weights``).
    """
    if batch.token_weight is not None:
        return batch.token_weight.to(dtype)
    lay, m = batch.layout, batch.mask.to(dtype)
    num_seqs = max(lay.num_seqs, 1)
    if options.loss_type == "grpo":
        return lay.per_token(1.0 / (lay.segment_sum(m).clamp(min=1.0) * num_seqs))
    if options.loss_type == "dr_grpo":
        length = options.max_completion_length or lay.max_len
        return m.new_full((lay.num_tokens,), 1.0 / (num_seqs * max(length, 1)))
    return m.new_full((lay.num_tokens,), 1.0) / m.sum().clamp(min=1.0)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from the policy's own samples, ``x = ref_logp - logp``:
    ``k1 = -x``, ``k2 = x² / 2``, ``k3 = exp(x) - x - 1`` (unbiased and >= 0; the default)."""
    x = ref_logp - logp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    return torch.expm1(x) - x


def clip_flags(
    ratio: torch.Tensor, advantages: torch.Tensor, options: LossOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)``: ratio clipped from below with ``A < 0`` / from above with ``A > 0``."""
    if options.loss_type == "cispo":
        high = (ratio > options.epsilon_high) & (advantages > 0)
        return torch.zeros_like(high), high
    low = (ratio < 1.0 - options.epsilon_low) & (advantages < 0)
    return low, (ratio > 1.0 + options.epsilon_high) & (advantages > 0)


@torch.no_grad()
def loss_metrics(
    mask: torch.Tensor,
    ratio: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    kl: torch.Tensor | None,
    entropy: torch.Tensor | None,
    *,
    ratio_per_seq: bool = False,
    flags_per_seq: bool = False,
    seq_id: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Detached 0-dim metrics with TRL's names.

    Token quantities ``(N,)`` are averaged over masked tokens; per-sequence ones ``(S,)`` (the GSPO
    ratio, and its clip flags when advantages are per sequence) over sequences, as TRL's
    ``masked_batch_mean`` does; ``seq_id (N,)`` then maps rows to sequences for the token-weighted
    ``clip_ratio/region_token_mean`` (Liger's ``clip_ratio``; equal to ``region_mean`` for token flags).
    """
    m = mask.to(torch.promote_types(mask.dtype, torch.float32))
    tokens = m.sum().clamp(min=1.0)

    def token_mean(x: torch.Tensor) -> torch.Tensor:  # values outside the mask are ignored, even inf/NaN
        return torch.where(m != 0, x.detach().to(m.dtype) * m, 0.0).sum() / tokens

    def seq_mean(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(m.dtype).mean() if x.numel() else m.new_zeros(())

    flag_mean = seq_mean if flags_per_seq else token_mean
    region = low | high
    metrics = {
        "ratio": seq_mean(ratio) if ratio_per_seq else token_mean(ratio),
        "clip_ratio/low_mean": flag_mean(low),
        "clip_ratio/high_mean": flag_mean(high),
        "clip_ratio/region_mean": flag_mean(region),
        # Liger's clip_ratio: per-sequence flags weighted by their token counts.
        "clip_ratio/region_token_mean": token_mean(region if seq_id is None else region[seq_id]),
    }
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy)
    return metrics


def grpo_objective(
    logp: torch.Tensor, batch: FlatBatch, options: LossOptions, entropy: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss on flat rows with torch autograd: ``logp (N,)`` (differentiable), ``entropy (N,)``
    (a metric only), the old/reference log-probs from ``batch``.

    Log-ratios are zeroed outside the mask before ``exp``, so garbage in padded positions of
    ``old_logp``/``ref_logp`` (common in padded batches) can never turn into ``inf * 0 = NaN``.
    """
    o, lay = options, batch.layout
    old_logp, ref_logp = batch.old_logp, batch.ref_logp
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp = logp.to(dtype)
    m = batch.mask.to(dtype)
    active = m != 0
    old = logp.detach() if old_logp is None else old_logp.to(dtype)
    log_ratio = torch.where(active, logp - old, logp.new_zeros(()))
    adv_seq = batch.advantages.to(dtype)
    adv = lay.per_token(adv_seq) if batch.advantages_per_seq else adv_seq

    if o.importance_sampling_level == "sequence":
        seq_ratio = torch.exp(lay.segment_sum(log_ratio * m) / lay.segment_sum(m).clamp(min=1.0))
        ratio = lay.per_token(seq_ratio)
    else:
        ratio = torch.exp(log_ratio)

    if o.loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=o.epsilon_high).detach() * adv * logp
    else:
        clipped = torch.clamp(ratio, 1.0 - o.epsilon_low, 1.0 + o.epsilon_high)
        unclipped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
        per_token = -torch.minimum(unclipped * adv, clipped * adv)

    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(active, ref_logp.to(dtype), logp.detach()), o.kl_estimator)
    if o.beta != 0.0:  # flatten_batch made sure ref_logp is given, so kl is not None
        per_token = per_token + o.beta * kl
    loss = (per_token * (m * token_weights(batch, o, dtype))).sum()

    if o.importance_sampling_level == "sequence":
        per_seq = batch.advantages_per_seq
        low, high = clip_flags(seq_ratio if per_seq else ratio, adv_seq if per_seq else adv, o)
        metrics = loss_metrics(
            m,
            seq_ratio,
            low,
            high,
            kl,
            entropy,
            ratio_per_seq=True,
            flags_per_seq=per_seq,
            seq_id=lay.seq_id if per_seq else None,
        )
    else:
        low, high = clip_flags(ratio, adv, o)
        metrics = loss_metrics(m, ratio, low, high, kl, entropy)
    return loss, metrics
