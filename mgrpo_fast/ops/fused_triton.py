"""The Triton glue of the loss ops: ``grpo_loss`` on the per-token kernel, and the fused lm_head +
GRPO loss at the 6·N·H·V FLOP floor. ``token_kernel_args`` is the one place a ``LossOptions`` becomes
the per-token kernel's arguments.

With token-level importance sampling, the loss's gradient with respect to each row's log-prob,
``dL/dlogp_i``, depends only on that row (its log-prob, old/ref log-probs, advantage and a
normalizer known before the pass). So one pass per chunk of rows does everything:

1. ``linear_logprobs_forward(..., stash=)``: the fused GEMM + online-softmax kernel gives ``logp``,
   ``entropy`` and ``lse`` and also writes the fp32 ``z = logits / T`` of the chunk into a bounded
   stash (``chunk x V`` fp32, reused for every chunk): ``2·c·H·V`` FLOPs;
2. ``grpo_token_terms``: per-row loss terms and ``dL/dlogp`` (elementwise kernel);
3. ``dlogits(..., stash=)``: ``dL/dz = g (1[k = target] - p) / T`` from the stash, no recompute;
4. two cuBLAS GEMMs: ``grad_hidden[chunk] = dlogits @ W`` and ``grad_W += dlogits^T @ h[chunk]``
   into an fp32 accumulator: ``4·c·H·V`` FLOPs.

Gradients are computed during the forward and scaled by the incoming gradient in the backward (the
loss is a scalar). Extra memory: the stash (``chunk·V·4`` bytes), one dlogits chunk in the GEMM
dtype, the fp32 ``(V, H)`` weight-gradient accumulator and ``grad_hidden`` — never ``N x V``.
The entropy bonus (``entropy_coef``) is linear in each row's entropy, so its gradient
``dL/dentropy_i = -entropy_coef · weight_i`` is known before the pass too and goes into the same
``dlogits`` (``dentropy/dz_k = -p_k (z_k - E_p[z])``): no extra logits pass.
Sequence-level importance sampling (GSPO) and ``vespo`` couple the rows of a sequence (the ratio, the
weight ``φ``), so they take the two-pass path instead (Triton log-probs + torch autograd for the
loss, 8·N·H·V).
"""

from __future__ import annotations

import torch

from mgrpo_fast.ops.logprobs import select_rows
from mgrpo_fast.ops.objective import (
    FlatBatch,
    entropy_bonus,
    entropy_weights,
    loss_metrics,
    token_weights,
    vespo_weights,
)
from mgrpo_fast.ops.options import LossOptions

# The LossOptions fields the per-token kernel reads (see token_kernel_args).
TOKEN_KERNEL_FIELDS = (
    "loss_type",
    "epsilon_low",
    "epsilon_high",
    "delta",
    "beta",
    "kl_estimator",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "use_bias_correction_kl",
)
# One fp32 z-stash of at most this many bytes (the chunk of rows is sized from it).
STASH_BYTES = 1 << 30


def token_kernel_args(options: LossOptions) -> dict[str, object]:
    """The keyword arguments of the per-token kernel's launchers (``grpo_token_terms``,
    ``triton_token_grpo_loss`` in ``mgrpo_fast.kernels.grpo_loss``) for ``options``.

    The kernel layer sits below ``ops`` and takes plain scalars; this is where they come from. The
    other fields never reach it: ``importance_sampling_level`` (the kernel is per token; ``choose_impl``
    keeps sequence level off it), ``max_completion_length`` (it enters the row weights,
    ``token_weights``, which the caller computes), the ``vespo_*`` parameters (the caller computes
    ``φ`` and passes it as the policy weight) and ``entropy_coef`` (the bonus is the caller's).
    """
    return {name: getattr(options, name) for name in TOKEN_KERNEL_FIELDS}


def stash_rows(vocab: int, block_m: int) -> int:
    """Rows per chunk: the fp32 ``(rows, V)`` stash fits ``STASH_BYTES``; a multiple of ``block_m``."""
    rows = STASH_BYTES // (4 * max(vocab, 1))
    return max(block_m, rows // block_m * block_m)


class TritonFusedLinearGRPOLoss(torch.autograd.Function):
    """``(hidden (M, H), weight (V, H), bias (V,) | None, targets (M,), old (M,) | None,
    ref (M,) | None, advantages (M,), mask (M,), token_weight (M,), policy_weight (M,) | None,
    entropy_weight (M,) | None, options, temperature, chunk_rows)`` ->
    ``(loss, logp, entropy, ratio, clip_low, clip_high, kl)``.

    ``loss = Σ token_weight · mask · ℓ - Σ entropy_weight · entropy``: ``entropy_weight`` is the
    bonus's ``entropy_coef · weight · mask`` per row (None: no bonus). Only ``loss`` is
    differentiable (w.r.t. hidden, weight, bias); the per-row tensors are detached and feed the
    metrics. Rows are the loss rows only (the caller selects them).
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        old,
        ref,
        advantages,
        mask,
        token_weight,
        policy_weight,
        entropy_weight,
        options,
        temperature,
        chunk_rows,
    ):
        from mgrpo_fast.kernels.grpo_loss import grpo_token_terms
        from mgrpo_fast.kernels.linear_logprobs import apply_dlogits, dlogits, linear_logprobs_forward

        kernel_args = token_kernel_args(options)
        rows, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # fp32 (V, H), created by the first chunk
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None
        # the bounded fp32 z stash, reused by every chunk (only needed to skip the backward recompute)
        stash = (
            torch.empty((min(chunk_rows, rows), vocab), dtype=torch.float32, device=hidden.device)
            if need_grad
            else None
        )
        pieces: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("loss", "logp", "entropy", "ratio", "low", "high", "kl")
        }
        pick = lambda t, sl: None if t is None else t[sl]  # noqa: E731
        for start in range(0, rows, chunk_rows):
            sl = slice(start, min(start + chunk_rows, rows))
            h_c, t_c = hidden[sl], targets[sl]
            z = None if stash is None else stash[: h_c.shape[0]]
            logp, entropy, lse = linear_logprobs_forward(h_c, weight, t_c, bias, temperature, stash=z)
            terms = grpo_token_terms(
                logp,
                pick(old, sl),
                pick(ref, sl),
                advantages[sl],
                mask[sl],
                token_weight[sl],
                pick(policy_weight, sl),
                compute_grad=need_grad,
                **kernel_args,
            )
            loss_terms = terms["loss_terms"]
            if entropy_weight is not None:  # the bonus: linear in the entropy, its gradient known now
                loss_terms = loss_terms - entropy_weight[sl] * entropy
            if need_grad:
                g_ent = None if entropy_weight is None else -entropy_weight[sl]
                d = dlogits(h_c, weight, bias, t_c, lse, entropy, terms["dlogp"], g_ent, temperature, stash=z)
                grad_w = apply_dlogits(
                    d, h_c, weight, None if grad_h is None else grad_h[sl], grad_w, grad_b, need_weight=need_w
                )
                del d
            for key, value in (
                ("loss", loss_terms),
                ("logp", logp),
                ("entropy", entropy),
                ("ratio", terms["ratio"]),
                ("low", terms["clip_low"]),
                ("high", terms["clip_high"]),
                ("kl", terms["kl"]),
            ):
                if value is not None:
                    pieces[key].append(value)
        del stash
        empty = hidden.new_zeros(0, dtype=torch.float32)
        cat = {k: torch.cat(v) if v else empty for k, v in pieces.items()}
        if rows == 0:
            cat["low"] = cat["high"] = torch.zeros(0, dtype=torch.bool, device=hidden.device)
        if ref is None:
            cat["kl"] = None
        loss = cat["loss"].sum()  # fixed-order reduction: deterministic
        if need_w:
            grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        if need_h and rows == 0:
            grad_h.zero_()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        extras = [cat[k] for k in ("logp", "entropy", "ratio", "low", "high", "kl") if cat[k] is not None]
        ctx.mark_non_differentiable(*extras)
        return loss, cat["logp"], cat["entropy"], cat["ratio"], cat["low"], cat["high"], cat["kl"]

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grad_h, grad_w, grad_b = ctx.saved_tensors

        def scale(g: torch.Tensor | None) -> torch.Tensor | None:
            return None if g is None else g * grad_loss.to(g.dtype)

        return (scale(grad_h), scale(grad_w), scale(grad_b)) + (None,) * 11


def triton_fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    token_weight: torch.Tensor,
    options: LossOptions,
    temperature: float,
    chunk_rows: int | None = None,
    policy_weight: torch.Tensor | None = None,
    entropy_weight: torch.Tensor | None = None,
):
    """Functional form on the loss rows: ``(loss, logp, entropy, ratio, clip_low, clip_high, kl)``.

    ``hidden (M, H)`` and ``weight (V, H)`` in one of fp32/fp16/bf16; the per-row inputs ``(M,)``
    are cast to fp32. ``chunk_rows`` defaults to a 1 GiB fp32 stash.
    """
    from mgrpo_fast.kernels.linear_logprobs import block_rows

    if options.importance_sampling_level != "token" or options.loss_type == "vespo":
        raise ValueError(
            "importance_sampling_level, loss_type: the one-pass fused kernel path needs token-level "
            "importance sampling and a per-row weight known before the pass (not vespo)"
        )
    f32 = lambda t: None if t is None else t.detach().to(torch.float32).contiguous()  # noqa: E731
    chunk = chunk_rows or stash_rows(weight.shape[0], block_rows(hidden.dtype))
    return TritonFusedLinearGRPOLoss.apply(
        hidden,
        weight,
        bias,
        targets,
        f32(old_logp),
        f32(ref_logp),
        f32(advantages),
        f32(mask),
        f32(token_weight),
        f32(policy_weight),
        f32(entropy_weight),
        options,
        float(temperature),
        int(chunk),
    )


def token_loss_triton(
    logp: torch.Tensor, batch: FlatBatch, options: LossOptions, entropy: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grpo_loss`` on the per-token kernel: ``logp (N,)`` (differentiable), ``entropy (N,)`` or None
    (differentiable when ``options.entropy_coef != 0``: the bonus is added here with torch autograd).
    VESPO's weight ``φ`` (a per-sequence reduction of the given log-probs) is computed here and passed
    as the kernel's policy weight."""
    from mgrpo_fast.kernels.grpo_loss import triton_token_grpo_loss

    f32 = lambda t: None if t is None else t.to(torch.float32)  # noqa: E731
    phi = None
    policy_weight = batch.row_is_ratio()
    if options.loss_type == "vespo":
        old = torch.zeros_like(logp) if batch.old_logp is None else batch.old_logp
        log_ratio = torch.where(batch.mask != 0, logp.detach() - old, 0.0).to(torch.float32)
        phi, policy_weight = vespo_weights(batch, log_ratio, options)
    loss, _, ratio, low, high, kl = triton_token_grpo_loss(
        f32(logp),
        f32(batch.old_logp),
        f32(batch.ref_logp),
        f32(batch.row_advantages()),
        batch.mask,
        token_weights(batch, options, torch.float32),
        f32(policy_weight),
        **token_kernel_args(options),
    )
    loss = loss + entropy_bonus(entropy, batch, options)
    metrics = loss_metrics(
        batch.mask, ratio, low, high, kl, entropy, phi=phi, phi_per_seq=batch.advantages_per_seq
    )
    return loss, metrics


def fused_loss_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    rows: torch.Tensor,
    batch: FlatBatch,
    options: LossOptions,
    chunk_size: int | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fused_linear_grpo_loss`` in one pass on the loss rows ``rows (M,)`` of ``batch``."""
    hidden_rows, target_rows, _ = select_rows(hidden, weight, targets, bias, temperature, rows)
    pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
    mask_rows = pick(batch.mask)
    entropy_weight = None
    if options.entropy_coef != 0.0:
        entropy_weight = options.entropy_coef * pick(
            batch.mask.to(torch.float32) * entropy_weights(batch, torch.float32)
        )
    loss, _, entropy, ratio, low, high, kl = triton_fused_linear_grpo_loss(
        hidden_rows,
        weight,
        bias,
        target_rows,
        pick(batch.old_logp),
        pick(batch.ref_logp),
        pick(batch.row_advantages()),
        mask_rows,
        pick(token_weights(batch, options, torch.float32)),
        options,
        temperature,
        chunk_size,
        policy_weight=pick(batch.row_is_ratio()),
        entropy_weight=entropy_weight,
    )
    return loss, loss_metrics(mask_rows, ratio, low, high, kl, entropy)
