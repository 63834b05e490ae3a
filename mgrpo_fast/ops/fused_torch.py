"""The fused lm_head + GRPO loss of the torch path in one pass (``fused_linear_grpo_loss(impl="torch")``
with a per-token objective): 6·N·H·V FLOPs instead of the two-stage path's 8·N·H·V.

When every row's loss term depends only on that row (token-level importance sampling and a per-token
loss type: ``ROW_LOCAL_LOSS_TYPES``), ``dL/dlogp_i`` is known as soon as the row's log-prob is, so
each chunk of rows does everything while its logits block is hot:

1. ``z = h_chunk @ W.T / T`` into one fp32 ``(c, V)`` block (``chunked.LogitsGemm``: fp32 logits
   from bf16 operands on CPU without a full fp32 weight copy), then ``logp``, ``entropy``, ``lse``
   and ``p = softmax(z)`` (a second block);
2. ``dL/dlogp`` (and ``dL/dentropy`` where the objective uses the entropy) of the chunk's rows:
   the torch objective (``objective.grpo_objective``) differentiated by autograd on all ``N`` rows,
   the other rows held constant (``O(N)`` per chunk; nothing of the objective is duplicated here);
3. ``dL/dz`` in place in ``p`` and the two gradient GEMMs (``chunked.gradient_gemms``: ``grad_hidden``
   of the chunk, ``grad_W`` into the fp32 accumulator).

The gradients are computed in the forward and scaled by the incoming gradient in the backward (the
loss is a scalar), as the one-pass Triton path (``fused_triton``) does. Memory: two ``(c, V)`` fp32
blocks, the fp32 ``(V, H)`` accumulator and ``grad_hidden``; never ``N x V``.
"""

from __future__ import annotations

import torch

from mgrpo_fast.ops.chunked import (
    LogitsGemm,
    default_chunk_size,
    dlogits_,
    gradient_gemms,
    gradient_operand,
    softmax_stats,
)
from mgrpo_fast.ops.logprobs import select_rows
from mgrpo_fast.ops.objective import FlatBatch, grpo_objective
from mgrpo_fast.ops.options import LossOptions

# Loss types whose per-token term depends on that token's log-prob alone (with token-level IS);
# vespo's weight needs the log-ratios of the whole sequence.
ROW_LOCAL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


def one_pass_serves(options: LossOptions) -> bool:
    """Whether the objective of ``options`` is row-local, so the one-pass path computes it exactly."""
    return options.importance_sampling_level == "token" and options.loss_type in ROW_LOCAL_LOSS_TYPES


def entropy_differentiated(options: LossOptions) -> bool:
    """Whether the objective of ``options`` has a gradient through the entropy (then each chunk
    keeps its logits block for ``dentropy/dz``): the entropy bonus ``entropy_coef``."""
    return options.entropy_coef != 0.0


def _scatter(values: torch.Tensor, size: int, positions: torch.Tensor) -> torch.Tensor:
    """``(size,)`` zeros with ``values`` at ``positions`` (differentiable w.r.t. ``values``)."""
    return values.new_zeros(size).index_put((positions,), values)


class TorchFusedLinearGRPOLoss(torch.autograd.Function):
    """``(hidden (M, H), weight (V, H), bias (V,) | None, targets (M,), positions (M,), batch,
    options, temperature, chunk_size)`` -> ``(loss, logp (M,), entropy (M,))``.

    ``hidden``/``targets`` are the loss rows, ``positions`` their row indices in ``batch`` (``N``
    rows). Only ``loss`` is differentiable (w.r.t. hidden, weight, bias).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, positions, batch, options, temperature, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gemm = LogitsGemm(hidden, weight, bias, temperature)
        acc, rows, num_tokens = gemm.acc, hidden.shape[0], batch.layout.num_tokens
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        logp = torch.zeros(rows, dtype=acc, device=hidden.device)
        entropy = torch.zeros_like(logp)
        need_grad = need_h or need_w or need_b
        # the logits block is needed after the statistics only for an entropy gradient; otherwise
        # the probabilities overwrite it and each chunk holds ONE (c, V) block
        keep_logits = need_grad and entropy_differentiated(options)
        for start in range(0, rows, chunk_size):
            sl = slice(start, min(start + chunk_size, rows))
            z = gemm(hidden[sl])
            logp[sl], entropy[sl], lse, p = softmax_stats(
                z, targets[sl], keep_probs=need_grad, in_place=not keep_logits
            )
            if not need_grad:
                continue
            g_logp, g_ent = _row_gradients(logp, entropy, sl, positions, num_tokens, batch, options)
            if g_ent is not None and not keep_logits:
                raise RuntimeError(
                    "the objective differentiates the entropy: entropy_differentiated must say so"
                )
            dz = dlogits_(
                p, z if keep_logits else None, targets[sl], lse, entropy[sl], g_logp, g_ent, gemm.temperature
            )
            del z, p
            dz = gradient_operand(dz, gemm, hidden[sl], grad_b)  # 16-bit operands: in place
            gradient_gemms(dz, hidden[sl], gemm, None if grad_h is None else grad_h[sl], grad_w)
            del dz
        with torch.no_grad():
            loss, _ = grpo_objective(
                _scatter(logp, num_tokens, positions),
                batch,
                options,
                _scatter(entropy, num_tokens, positions),
            )
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None, None, None)


def _row_gradients(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    chunk: slice,
    positions: torch.Tensor,
    num_tokens: int,
    batch: FlatBatch,
    options: LossOptions,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dL/dlogp, dL/dentropy or None)`` of the rows ``chunk`` of the loss rows: autograd through
    the torch objective on all ``num_tokens`` rows, the rows outside the chunk held constant (their
    values do not reach a row-local chunk's gradient)."""
    with torch.enable_grad():
        leaf_logp = logp[chunk].detach().requires_grad_(True)
        leaf_ent = entropy[chunk].detach().requires_grad_(True)
        pos = positions[chunk]
        full_logp = _scatter(logp.detach(), num_tokens, positions).index_put((pos,), leaf_logp)
        full_ent = _scatter(entropy.detach(), num_tokens, positions).index_put((pos,), leaf_ent)
        loss, _ = grpo_objective(full_logp, batch, options, full_ent)
        g_logp, g_ent = torch.autograd.grad(loss, (leaf_logp, leaf_ent), allow_unused=True)
    if g_logp is None:
        g_logp = torch.zeros_like(leaf_logp)
    return g_logp.detach(), None if g_ent is None else g_ent.detach()


def fused_loss_torch(
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
    """``fused_linear_grpo_loss`` in one pass on the loss rows ``rows (M,)`` of ``batch`` (needs
    :func:`one_pass_serves`)."""
    if not one_pass_serves(options):
        raise ValueError(
            f"options: the one-pass torch path needs a row-local objective (importance_sampling_level="
            f"'token', loss_type in {ROW_LOCAL_LOSS_TYPES}), got {options.importance_sampling_level!r}, "
            f"{options.loss_type!r}"
        )
    hidden_rows, target_rows, _ = select_rows(hidden, weight, targets, bias, temperature, rows)
    chunk = chunk_size or default_chunk_size(hidden_rows.shape[0], weight.shape[0], hidden.device)
    loss, logp, entropy = TorchFusedLinearGRPOLoss.apply(
        hidden_rows, weight, bias, target_rows, rows, batch, options, float(temperature), int(chunk)
    )
    num_tokens = batch.layout.num_tokens
    # the metrics: the objective once more on the detached log-probs (O(N), no logits)
    _, metrics = grpo_objective(
        _scatter(logp, num_tokens, rows), batch, options, _scatter(entropy, num_tokens, rows)
    )
    return loss, metrics
