"""The GRPO objective on flat rows with torch autograd: the torch path of both loss ops, and the
pieces the Triton glue shares with it (the batch layout, the reduction weights, the metrics).

Both public layouts become flat rows here: padded token tensors ``(B, T)`` are read row-major as
``N = B * T`` rows, packed ones ``(N,)`` are already flat; a ``SequenceLayout`` maps rows to
sequences. The formulas of every loss type are in ``reference.grpo_loss_ref`` (the executable spec).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mgrpo_fast.ops.layout import SequenceLayout
from mgrpo_fast.ops.options import LossOptions
from mgrpo_fast.ops.validation import (
    check_float,
    check_same_device,
    check_shape,
    check_tensor,
    non_finite_error,
    value_ranges,
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
        is_ratio: optional sampler correction ``v`` (``vllm_is_ratio``), ``(S,)`` per sequence
            (``is_ratio_per_seq``) or ``(N,)`` per row.
        padding_loss: Liger's ``luspo`` reduction: every row carries loss (``Σ token_weight · ℓ``
            over all rows, masked or not) and its values are used as given; the mask still defines
            the sequences' means (GSPO ratio, VESPO weight) and the metrics.
    """

    layout: SequenceLayout
    mask: torch.Tensor
    advantages: torch.Tensor
    advantages_per_seq: bool
    token_weight: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    is_ratio: torch.Tensor | None = None
    is_ratio_per_seq: bool = False
    padding_loss: bool = False

    def row_advantages(self) -> torch.Tensor:
        """``(N,)``: the advantage of every row."""
        return self.layout.per_token(self.advantages) if self.advantages_per_seq else self.advantages

    def row_is_ratio(self) -> torch.Tensor | None:
        """``(N,)``: the sampler correction of every row (None when not given)."""
        if self.is_ratio is None or not self.is_ratio_per_seq:
            return self.is_ratio
        return self.layout.per_token(self.is_ratio)


def per_sequence_or_token(
    name: str,
    t: torch.Tensor,
    per_seq_shape: tuple[int, ...],
    token_shape: tuple[int, ...],
    seq_symbols: str,
    *,
    padded: bool,
) -> tuple[torch.Tensor, bool]:
    """``(flat, per_seq)``: ``t`` read per sequence ``(S,)`` (also ``(B, 1)`` in the padded layout) or
    per token (shaped like the token tensors, flattened). Per sequence first: when every packed
    sequence has one token (S == N) both readings give the same loss, and per sequence keeps the GSPO
    metrics sequence means."""
    shape = tuple(t.shape)
    if shape == per_seq_shape or (padded and shape == (*per_seq_shape, 1)):
        return t.reshape(-1), True
    if shape == token_shape:
        return t.reshape(-1), False
    also = f" or {(*per_seq_shape, 1)}" if padded else ""
    raise ValueError(
        f"{name}: expected {seq_symbols} = {per_seq_shape}{also} per sequence or {token_shape} per token, "
        f"got {shape}"
    )


def flatten_batch(
    tokens: Mapping[str, torch.Tensor | None],
    options: LossOptions,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    token_weight: torch.Tensor | None = None,
    vllm_is_ratio: torch.Tensor | None = None,
    *,
    padding_loss: bool = False,
) -> FlatBatch:
    """Validate a batch and flatten it.

    ``tokens``: the caller's token-shaped tensors by argument name. The first (``logp`` or
    ``targets``, checked by the caller) sets the shape ``(B, T)`` / ``(N,)`` and the device; the
    others are optional float tensors shaped like it (``old_logp``, ``ref_logp``, ``entropy``);
    ``ref_logp`` is required when ``options.beta != 0``. ``vllm_is_ratio``: per sequence or per
    token, finite and ``>= 0``. ``padding_loss``: see :class:`FlatBatch` (needs ``token_weight``).
    """
    (token_name, first), *others = tokens.items()
    token_shape, device = tuple(first.shape), first.device
    check_float("advantages", advantages)
    here = torch.empty(0, device=device)
    if cu_seqlens is None:
        if len(token_shape) != 2:
            raise ValueError(
                f"{token_name}: expected (B, T) for the padded layout (or pass cu_seqlens for the "
                f"packed layout (N,)), got shape {token_shape}"
            )
        batch, length = token_shape
        layout = SequenceLayout.padded(batch, length, device)
        per_seq_shape, seq_symbols = (batch,), "(B,)"
    else:
        check_tensor("cu_seqlens", cu_seqlens)
        if len(token_shape) != 1:
            raise ValueError(
                f"{token_name}: expected (N,) for the packed layout (cu_seqlens given), "
                f"got shape {token_shape}"
            )
        check_same_device(token_name, here, cu_seqlens=cu_seqlens)
        layout = SequenceLayout.packed(cu_seqlens, token_shape[0])
        per_seq_shape, seq_symbols = (layout.num_seqs,), "(S,)"

    check_same_device(token_name, here, advantages=advantages, mask=mask, vllm_is_ratio=vllm_is_ratio)
    padded = cu_seqlens is None
    adv, per_seq = per_sequence_or_token(
        "advantages", advantages, per_seq_shape, token_shape, seq_symbols, padded=padded
    )
    is_ratio, ratio_per_seq = None, False
    if vllm_is_ratio is not None:
        check_float("vllm_is_ratio", vllm_is_ratio)
        is_ratio, ratio_per_seq = per_sequence_or_token(
            "vllm_is_ratio", vllm_is_ratio.detach(), per_seq_shape, token_shape, seq_symbols, padded=padded
        )
    if mask is None:
        flat_mask = torch.ones(layout.num_tokens, device=device)
    else:
        check_tensor("mask", mask)
        check_shape("mask", mask, token_shape, "like the token tensors")
        flat_mask = mask.reshape(-1).to(torch.float32 if not mask.is_floating_point() else mask.dtype)
    if token_weight is not None:
        check_float("token_weight", token_weight)
        check_shape("token_weight", token_weight, token_shape, "like the token tensors")
        check_same_device(token_name, here, token_weight=token_weight)
        token_weight = token_weight.reshape(-1)
    elif padding_loss:
        raise ValueError("token_weight: required with padding_loss (the weights of every row)")
    for name, t in others:
        if t is not None:
            check_float(name, t)
            check_shape(name, t, token_shape, "like the token tensors")
            check_same_device("the token tensors", here, **{name: t})
    check_values(
        advantages=adv,
        old_logp=tokens.get("old_logp"),
        ref_logp=tokens.get("ref_logp"),
        vllm_is_ratio=is_ratio,
        token_weight=token_weight,
        mask=mask,
    )
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
        is_ratio=is_ratio,
        is_ratio_per_seq=ratio_per_seq,
        padding_loss=padding_loss,
    )


def check_values(
    *,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    vllm_is_ratio: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> None:
    """The values of a batch's inputs (shapes and dtypes already checked): ``old_logp`` and
    ``ref_logp`` finite where the mask is non-zero (padding may hold anything: it is never read),
    ``advantages``, ``vllm_is_ratio`` and ``token_weight`` finite everywhere, the last two ``>= 0``;
    ``mask`` 0/1 (any dtype; bool needs no check). A ``-1`` in a mask would flip the sign of that
    token's loss, a ``0.5`` halve it: both are refused rather than read as weights (``token_weight``
    is for weights).

    Cost: one fused min/max reduction per tensor (``old_logp``/``ref_logp`` with a mask: one
    elementwise select more; a float mask: one elementwise pass more, for ``m - m²``) and one host
    synchronisation for the whole batch: O(N) reads, against the lm_head's O(N·H·V) FLOPs in
    ``fused_linear_grpo_loss``, and of the order of ``grpo_loss``'s own few O(N) passes.
    """
    active = None if mask is None else mask != 0
    probes = {"advantages": advantages}
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None:
            probes[name] = t if active is None else torch.where(active, t, 0.0)
    for name, t in (("vllm_is_ratio", vllm_is_ratio), ("token_weight", token_weight)):
        if t is not None:
            probes[name] = t
    if mask is not None and mask.dtype != torch.bool:
        # m - m² is 0 exactly where m is 0 or 1 (and NaN where m is); integer masks: their range
        probes["mask"] = torch.addcmul(mask, mask, mask, value=-1) if mask.is_floating_point() else mask
    ranges = value_ranges(probes)
    for name, (low, high) in sorted(ranges.items(), key=lambda item: item[0] != "mask"):
        if name == "mask":
            ok = low == high == 0.0 if mask.is_floating_point() else (low >= 0 and high <= 1)
            if not ok:
                values = mask[(mask != 0) & (mask != 1)].unique()[:5].tolist()
                raise ValueError(
                    "mask: expected 0/1 values (1 = the token carries the loss) or a bool tensor, got "
                    f"{values} (weights go in token_weight)"
                )
        elif not (math.isfinite(low) and math.isfinite(high)):
            raise non_finite_error(name, probes[name])
        elif name in ("vllm_is_ratio", "token_weight") and low < 0:
            what = "importance weights" if name == "vllm_is_ratio" else "weights"
            raise ValueError(f"{name}: expected {what} >= 0, got a minimum of {low}")


def token_weights(batch: FlatBatch, options: LossOptions, dtype: torch.dtype) -> torch.Tensor:
    """``(N,)`` weight of each row so that ``loss = Σ_rows weight · mask · ℓ`` for every loss type.

    * ``dapo``, ``bnpo``, ``cispo``, ``vespo``: ``1 / max(1, M)`` (``M`` = mask sum of the batch);
    * ``grpo``, ``sapo``: ``1 / (S · max(1, M_i))`` for a row of sequence ``i`` (token mean, then
      sequence mean);
    * ``dr_grpo``: ``1 / (S · L)``;
    * ``luspo``: ``1 / S`` (each sequence's summed loss, then the mean over sequences);
    * given ``batch.token_weight``: that, whatever the loss type. A trainer that splits one batch into
      micro-batches (and ranks) passes the weights of the *whole* batch, so the micro-batch losses sum
      to the loss of the whole batch (``mgrpo_fast.rl.update.global_sequence_weights``).
    """
    if batch.token_weight is not None:
        return batch.token_weight.to(dtype)
    lay, m = batch.layout, batch.mask.to(dtype)
    num_seqs = max(lay.num_seqs, 1)
    if options.loss_type in ("grpo", "sapo"):
        return lay.per_token(1.0 / (lay.segment_sum(m).clamp(min=1.0) * num_seqs))
    if options.loss_type == "dr_grpo":
        length = options.max_completion_length or lay.max_len
        return m.new_full((lay.num_tokens,), 1.0 / (num_seqs * max(length, 1)))
    if options.loss_type == "luspo":
        return m.new_full((lay.num_tokens,), 1.0 / num_seqs)
    return m.new_full((lay.num_tokens,), 1.0) / m.sum().clamp(min=1.0)


def entropy_weights(batch: FlatBatch, dtype: torch.dtype) -> torch.Tensor:
    """``(N,)`` weights of the entropy bonus, ``bonus = Σ_rows weight · mask · H``: the token mean
    ``1 / max(1, M)`` whatever the loss type (TRL's definition), or ``batch.token_weight`` when given
    (a split batch then sums to the bonus of the whole batch under the trainer's weights)."""
    if batch.token_weight is not None:
        return batch.token_weight.to(dtype)
    m = batch.mask.to(dtype)
    return m.new_full((batch.layout.num_tokens,), 1.0) / m.sum().clamp(min=1.0)


def entropy_bonus(
    entropy: torch.Tensor | None, batch: FlatBatch, options: LossOptions, dtype: torch.dtype = torch.float32
) -> torch.Tensor | float:
    """``-entropy_coef · Σ weight · mask · entropy`` (:func:`entropy_weights`; 0 when
    ``entropy_coef == 0``), differentiable through ``entropy (N,)``."""
    if options.entropy_coef == 0.0:
        return 0.0
    if entropy is None:
        raise ValueError("entropy: required when entropy_coef != 0 (the bonus is its token mean)")
    weights = batch.mask.to(dtype) * entropy_weights(batch, dtype)
    return -options.entropy_coef * (entropy.to(dtype) * weights).sum()


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
    """``(low, high)``: ratio clipped from below with ``A < 0`` / from above with ``A > 0``; sapo
    and vespo do not clip (all False)."""
    if options.loss_type in ("sapo", "vespo"):
        none = torch.zeros_like(ratio * advantages, dtype=torch.bool)
        return none, none
    if options.loss_type == "cispo":
        high = (ratio > options.epsilon_high) & (advantages > 0)
        return torch.zeros_like(high), high
    low = (ratio < 1.0 - options.epsilon_low) & (advantages < 0)
    return low, (ratio > 1.0 + options.epsilon_high) & (advantages > 0)


VESPO_LOG_W_MIN = math.log(1e-8)
"""Lower clamp of VESPO's log sequence weight (and of the log sampler ratios folded into it)."""


@torch.no_grad()
def vespo_log_weight(batch: FlatBatch, token_log_ratio: torch.Tensor) -> torch.Tensor:
    """``(S,)`` VESPO's clamped log sequence weight: ``Σ_t m_t clamp(x_t, -20, 20)`` (the log of the
    product of the token ratios) plus ``Σ clamp(log v, log 1e-8, 20)`` of the sampler correction
    (one term per sequence, or every row of the sequence, padding included, as TRL and Liger)."""
    lay, m = batch.layout, batch.mask.to(token_log_ratio.dtype)
    seq = lay.segment_sum(torch.clamp(token_log_ratio, -20.0, 20.0) * m)
    if batch.is_ratio is not None:
        log_v = torch.clamp(torch.log(batch.is_ratio.to(seq.dtype)), VESPO_LOG_W_MIN, 20.0)
        seq = seq + (log_v if batch.is_ratio_per_seq else lay.segment_sum(log_v))
    return torch.clamp(seq, VESPO_LOG_W_MIN, 20.0)


@torch.no_grad()
def vespo_phi(log_w: torch.Tensor, advantages: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """VESPO's Gamma weight ``φ = exp(λ + k log w - λ w)`` (``φ(1) = 1``), with ``(k, λ)`` of the sign
    of the advantage (``>= 0``: the ``_pos`` pair), ``λ >= 1e-4``; NaN/inf become 0. ``log_w`` and
    ``advantages`` broadcast together (per sequence or per row)."""
    o = options
    nonneg = advantages >= 0
    k = torch.where(nonneg, o.vespo_k_pos, o.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_weights(
    batch: FlatBatch, token_log_ratio: torch.Tensor, options: LossOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi, phi_rows)``: VESPO's detached weight, ``(S,)`` with per-sequence advantages (else
    ``(N,)``, the sign of each row's advantage choosing its ``(k, λ)``), and broadcast to ``(N,)`` rows.
    ``token_log_ratio (N,)``: ``logp - old_logp``, 0 outside the mask."""
    lay = batch.layout
    log_w = vespo_log_weight(batch, token_log_ratio.detach())
    if batch.advantages_per_seq:
        phi = vespo_phi(log_w, batch.advantages.to(log_w.dtype), options)
        return phi, lay.per_token(phi)
    phi = vespo_phi(lay.per_token(log_w), batch.advantages.to(log_w.dtype), options)
    return phi, phi


def policy_term(
    logp: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor, options: LossOptions, phi: torch.Tensor | None
) -> torch.Tensor:
    """``(N,)`` per-row policy term of ``reference.grpo_loss_ref`` (before the sampler correction)."""
    o = options
    if o.loss_type == "cispo":
        return -torch.clamp(ratio, max=o.epsilon_high).detach() * adv * logp
    if o.loss_type == "vespo":
        return -phi * adv * logp
    if o.loss_type == "sapo":
        tau = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg).to(ratio.dtype)
        return -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    clipped = torch.clamp(ratio, 1.0 - o.epsilon_low, 1.0 + o.epsilon_high)
    unclipped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
    return -torch.minimum(unclipped * adv, clipped * adv)


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
    phi: torch.Tensor | None = None,
    phi_per_seq: bool = False,
) -> dict[str, torch.Tensor]:
    """Detached 0-dim metrics with TRL's names.

    Token quantities ``(N,)`` are averaged over masked tokens; per-sequence ones ``(S,)`` (the GSPO
    ratio, and its clip flags when advantages are per sequence; VESPO's ``φ``) over sequences, as
    TRL's ``masked_batch_mean`` does; ``seq_id (N,)`` then maps rows to sequences for the
    token-weighted ``clip_ratio/region_token_mean`` (Liger's ``clip_ratio``; equal to
    ``region_mean`` for token flags).
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
    if phi is not None:
        metrics["vespo/phi_seq_mean"] = seq_mean(phi) if phi_per_seq else token_mean(phi)
    return metrics


def grpo_objective(
    logp: torch.Tensor, batch: FlatBatch, options: LossOptions, entropy: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss on flat rows with torch autograd: ``logp (N,)`` (differentiable), ``entropy (N,)`` (the
    metric, and the differentiable bonus when ``options.entropy_coef != 0``), the old/reference
    log-probs and the sampler correction from ``batch``.

    Log-ratios are zeroed outside the mask before ``exp``, so garbage in padded positions of
    ``old_logp``/``ref_logp`` (common in padded batches) can never turn into ``inf * 0 = NaN``
    (``batch.padding_loss``: Liger's luspo, where every row's own values count).
    """
    o, lay = options, batch.layout
    old_logp, ref_logp = batch.old_logp, batch.ref_logp
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp = logp.to(dtype)
    m = batch.mask.to(dtype)
    in_mask = m != 0
    valid = torch.ones_like(in_mask) if batch.padding_loss else in_mask
    old = logp.detach() if old_logp is None else old_logp.to(dtype)
    log_ratio = torch.where(valid, logp - old, logp.new_zeros(()))
    masked_log_ratio = log_ratio if not batch.padding_loss else torch.where(in_mask, log_ratio, 0.0)
    adv_seq = batch.advantages.to(dtype)
    adv = lay.per_token(adv_seq) if batch.advantages_per_seq else adv_seq

    sequence_level = o.importance_sampling_level == "sequence"
    if sequence_level:
        seq_ratio = torch.exp(lay.segment_sum(masked_log_ratio * m) / lay.segment_sum(m).clamp(min=1.0))
        ratio = lay.per_token(seq_ratio)
    else:
        ratio = torch.exp(log_ratio)

    phi = phi_rows = None
    if o.loss_type == "vespo":
        phi, phi_rows = vespo_weights(batch, masked_log_ratio, o)
    per_token = policy_term(logp, ratio, adv, o, phi_rows)
    v = batch.row_is_ratio()
    if v is not None and o.loss_type != "vespo":
        per_token = per_token * v.to(dtype)

    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(valid, ref_logp.to(dtype), logp.detach()), o.kl_estimator)
        if o.use_bias_correction_kl:
            kl = kl * ratio
    if o.beta != 0.0:  # flatten_batch made sure ref_logp is given, so kl is not None
        per_token = per_token + o.beta * kl
    weights = token_weights(batch, o, dtype)
    loss = (per_token * (weights if batch.padding_loss else m * weights)).sum()
    loss = loss + entropy_bonus(entropy, batch, o, dtype)

    per_seq = sequence_level and batch.advantages_per_seq
    low, high = clip_flags(seq_ratio if per_seq else ratio, adv_seq if per_seq else adv, o)
    return loss, loss_metrics(
        m,
        seq_ratio if sequence_level else ratio,
        low,
        high,
        kl,
        entropy,
        ratio_per_seq=sequence_level,
        flags_per_seq=per_seq,
        seq_id=lay.seq_id if per_seq else None,
        phi=phi,
        phi_per_seq=batch.advantages_per_seq,
    )
