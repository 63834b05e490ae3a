"""The clipped GRPO loss: on given log-probs (``grpo_loss``) or fused with the lm_head
(``fused_linear_grpo_loss``, which never materializes the ``[tokens x vocab]`` logits).

Both accept two layouts:

* padded: token tensors ``(B, T)``, ``hidden (B, T, H)``, ``mask (B, T)``, ``advantages (B,)`` or ``(B, T)``;
* packed: token tensors ``(N,)``, ``hidden (N, H)``, ``cu_seqlens (S+1,)`` int32 sequence
  boundaries, ``mask (N,)``, ``advantages (S,)`` or ``(N,)``.

The formulas of every loss type are in ``reference.grpo_loss_ref`` (the executable spec) and the
README. Internally both layouts become flat rows plus a ``SequenceLayout``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mgrpo_fast.ops.dispatch import resolve_impl, triton_op_status
from mgrpo_fast.ops.layout import SequenceLayout
from mgrpo_fast.ops.logprobs import linear_logprobs_with_lse, select_rows, use_triton
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
    """A batch in flat-row form: ``mask (N,)`` float, ``advantages (S,)`` or ``(N,)``, and optional
    caller-given reduction weights ``token_weight (N,)`` (see :func:`token_weights`)."""

    layout: SequenceLayout
    mask: torch.Tensor
    advantages: torch.Tensor
    advantages_per_seq: bool
    token_weight: torch.Tensor | None = None


def flatten_batch(
    token_shape: torch.Size,
    token_name: str,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    device: torch.device,
    token_weight: torch.Tensor | None = None,
) -> FlatBatch:
    """Validate the layout of a batch whose token tensors have ``token_shape`` and flatten it."""
    check_float("advantages", advantages)
    check_finite("advantages", advantages)
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
        check_same_device(token_name, torch.empty(0, device=device), cu_seqlens=cu_seqlens)
        layout = SequenceLayout.packed(cu_seqlens, token_shape[0])
        per_seq_shape, seq_symbols = (layout.num_seqs,), "(S,)"

    check_same_device(token_name, torch.empty(0, device=device), advantages=advantages, mask=mask)
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
        check_same_device(token_name, torch.empty(0, device=device), token_weight=token_weight)
        check_finite("token_weight", token_weight)
        low = float(token_weight.min()) if token_weight.numel() else 0.0
        if low < 0:
            raise ValueError(f"token_weight: expected weights >= 0, got a minimum of {low}")
        token_weight = token_weight.reshape(-1)
    return FlatBatch(layout, flat_mask, adv, per_seq, token_weight)


def _check_token_tensor(
    name: str, t: torch.Tensor | None, token_shape: torch.Size, device: torch.device
) -> None:
    if t is None:
        return
    check_float(name, t)
    check_shape(name, t, token_shape, "like the token tensors")
    check_same_device("the token tensors", torch.empty(0, device=device), **{name: t})


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
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    batch: FlatBatch,
    options: LossOptions,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss on flat rows with torch autograd: ``logp/old_logp/ref_logp/entropy (N,)``.

    Log-ratios are zeroed outside the mask before ``exp``, so garbage in padded positions of
    ``old_logp``/``ref_logp`` (common in padded batches) can never turn into ``inf * 0 = NaN``.
    """
    o, lay = options, batch.layout
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
    if o.beta != 0.0:
        if kl is None:
            raise ValueError(f"ref_logp: required when beta != 0 (beta={o.beta}); pass reference log-probs")
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


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    entropy: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO loss on per-token log-probs.

    Args:
        logp: ``(B, T)`` padded or ``(N,)`` packed log-probs of the current policy (differentiable).
        old_logp: like ``logp``, from the sampling policy; ``None`` = on-policy (ratio exactly 1).
        ref_logp: like ``logp``, from the frozen reference; needed when ``beta != 0``.
        advantages: ``(B,)``/``(S,)`` per sequence or like ``logp`` per token. Must be finite.
        mask: like ``logp``; 1 where the token carries the loss. ``None`` = all tokens.
        cu_seqlens: ``(S+1,)`` int sequence boundaries: selects the packed layout.
        entropy: optional, like ``logp``; reported as the ``entropy`` metric.
        token_weight: optional, like ``logp``, >= 0: the reduction weights, ``loss = Σ weight · mask · ℓ``,
            replacing the loss type's normalization (for a batch split into micro-batches: pass the
            weights of the whole batch, and the micro-batch losses sum to its loss).
        loss_type, epsilon_low, epsilon_high, delta, beta, kl_estimator, importance_sampling_level,
        max_completion_length: see ``LossOptions``.
        impl: ``"auto" | "torch" | "triton"``; Triton (one elementwise kernel) serves token-level
            importance sampling with fp32/bf16/fp16 log-probs, GSPO and fp64 stay on torch autograd.

    Returns:
        ``(loss, metrics)``: a 0-dim loss (fp32, or fp64 for fp64 inputs) and a dict of detached
        0-dim tensors: ``ratio``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean``, ``kl`` (when ``ref_logp`` is given), ``entropy`` (when given).
    """
    options = LossOptions(
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        beta=beta,
        kl_estimator=kl_estimator,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
    )
    check_float("logp", logp)
    batch = flatten_batch(logp.shape, "logp", advantages, mask, cu_seqlens, logp.device, token_weight)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy)):
        _check_token_tensor(name, t, logp.shape, logp.device)
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    triton_ok = options.importance_sampling_level == "token" and logp.dtype != torch.float64
    if resolve_impl(impl, "grpo_loss", logp.device) == "triton" and (triton_ok or impl == "triton"):
        if not triton_ok:
            raise ValueError(
                "impl: 'triton' serves token-level importance sampling on fp32/bf16/fp16 log-probs"
            )
        return _grpo_loss_triton(flat(logp), flat(old_logp), flat(ref_logp), batch, options, flat(entropy))
    return grpo_objective(flat(logp), flat(old_logp), flat(ref_logp), batch, options, flat(entropy))


def _grpo_loss_triton(logp, old_logp, ref_logp, batch: FlatBatch, options: LossOptions, entropy):
    """``grpo_loss`` on the elementwise Triton kernel (token-level importance sampling)."""
    from mgrpo_fast.kernels.grpo_loss import triton_token_grpo_loss

    if options.beta != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp: required when beta != 0 (beta={options.beta}); pass reference log-probs")
    f32 = lambda t: None if t is None else t.to(torch.float32)  # noqa: E731
    lay = batch.layout
    adv = lay.per_token(batch.advantages) if batch.advantages_per_seq else batch.advantages
    loss, _, ratio, low, high, kl = triton_token_grpo_loss(
        f32(logp),
        f32(old_logp),
        f32(ref_logp),
        f32(adv),
        batch.mask,
        token_weights(batch, options, torch.float32),
        loss_type=options.loss_type,
        epsilon_low=options.epsilon_low,
        epsilon_high=options.epsilon_high,
        delta=options.delta,
        beta=options.beta,
        kl_estimator=options.kl_estimator,
    )
    return loss, loss_metrics(batch.mask, ratio, low, high, kl, entropy)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    token_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lm_head + log-softmax + clipped GRPO loss in one pass, never materializing the logits.

    Only rows with a non-zero ``mask`` are computed (prompt and padding rows cost nothing).

    Args:
        hidden: ``(B, T, H)`` padded or ``(N, H)`` packed final hidden states (differentiable).
        weight: ``(V, H)`` lm_head weight (differentiable); ``bias``: optional ``(V,)``.
        targets: ``(B, T)`` or ``(N,)`` int ids of the sampled tokens, in ``[0, V)`` where masked in.
        advantages, mask, cu_seqlens, old_logp, ref_logp, token_weight: as in ``grpo_loss`` (token
            tensors shaped like ``targets``).
        temperature: the sampling temperature; logits are divided by it.
        chunk_size: rows per logits block of the torch path.
        impl: ``"auto" | "torch" | "triton"`` for the log-prob computation.

    Returns:
        ``(loss, metrics)`` as ``grpo_loss``, with the ``entropy`` metric always present.
    """
    options = LossOptions(
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        beta=beta,
        kl_estimator=kl_estimator,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
    )
    check_tensor("targets", targets)
    check_tensor("hidden", hidden)
    if hidden.shape[:-1] != targets.shape or hidden.dim() != targets.dim() + 1:
        raise ValueError(
            f"hidden: expected shape targets.shape + (H,) = {tuple(targets.shape)} + (H,), "
            f"got {tuple(hidden.shape)}"
        )
    batch = flatten_batch(
        targets.shape, "targets", advantages, mask, cu_seqlens, targets.device, token_weight
    )
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        _check_token_tensor(name, t, targets.shape, targets.device)
    if options.beta != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp: required when beta != 0 (beta={options.beta}); pass reference log-probs")

    rows = torch.nonzero(batch.mask, as_tuple=True)[0]
    if (
        options.importance_sampling_level == "token"
        and use_triton(impl, "linear_logprobs", hidden, weight)
        and triton_op_status("grpo_loss") is None
    ):
        return _fused_loss_triton(
            hidden, weight, targets, bias, temperature, rows, batch, options, old_logp, ref_logp, chunk_size
        )
    logp_rows, entropy_rows, _ = linear_logprobs_with_lse(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        row_index=rows,
        chunk_size=chunk_size,
        impl=impl,
    )
    num_tokens = batch.layout.num_tokens
    # Back to all N rows (masked-out rows hold 0 and are ignored by the objective).
    logp = logp_rows.new_zeros(num_tokens).index_copy(0, rows, logp_rows)
    entropy = entropy_rows.detach().new_zeros(num_tokens).index_copy(0, rows, entropy_rows.detach())
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    return grpo_objective(logp, flat(old_logp), flat(ref_logp), batch, options, entropy)


def _fused_loss_triton(
    hidden,
    weight,
    targets,
    bias,
    temperature,
    rows,
    batch: FlatBatch,
    options: LossOptions,
    old_logp,
    ref_logp,
    chunk_size,
):
    """The one-pass (6·N·H·V) fused path on the loss rows; see ``fused_triton``."""
    from mgrpo_fast.ops.fused_triton import triton_fused_linear_grpo_loss

    hidden_rows, target_rows, _ = select_rows(hidden, weight, targets, bias, temperature, rows)
    lay = batch.layout
    adv = lay.per_token(batch.advantages) if batch.advantages_per_seq else batch.advantages
    pick = lambda t: None if t is None else t.reshape(-1).index_select(0, rows)  # noqa: E731
    mask_rows = batch.mask.index_select(0, rows)
    weight_rows = token_weights(batch, options, torch.float32).index_select(0, rows)
    loss, _, entropy, ratio, low, high, kl = triton_fused_linear_grpo_loss(
        hidden_rows,
        weight,
        bias,
        target_rows,
        pick(old_logp),
        pick(ref_logp),
        pick(adv),
        mask_rows,
        weight_rows,
        options,
        temperature,
        chunk_size,
    )
    return loss, loss_metrics(mask_rows, ratio, low, high, kl, entropy)
