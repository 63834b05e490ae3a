"""Per-token log-probs and entropy of ``hidden @ weight.T`` without materializing the logits.

``linear_logprobs`` is the public op. Its torch implementation walks the rows in chunks: each
chunk's ``(chunk, V)`` logits block is computed in fp32, reduced to ``logp``, ``entropy`` and
``lse`` and freed; the backward recomputes each block from the saved ``lse``. Peak extra memory is
``O(chunk * V)`` for the block plus ``O(V * H)`` fp32 for the weight gradient accumulator, and
never grows with ``N * V``.

Gradients, with ``z = logits / T``, ``p = softmax(z)`` and upstream ``g_logp``, ``g_ent`` per row::

    d logp    / d z_k = 1[k = target] - p_k
    d entropy / d z_k = -p_k (z_k - E_p[z])          (E_p[z] = lse - entropy)
    d z / d logits    = 1 / T
"""

from __future__ import annotations

import torch

from mgrpo_fast.ops.chunked import (
    LogitsGemm,
    accumulation_dtype,
    default_chunk_size,
    dlogits_,
    gradient_gemms,
    gradient_operand,
    probs_,
    softmax_stats,
)
from mgrpo_fast.ops.dispatch import choose_impl
from mgrpo_fast.ops.validation import (
    check_float,
    check_index_range,
    check_integer,
    check_ndim,
    check_positive,
    check_same_device,
    check_shape,
)


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Autograd op: ``(hidden (M, H), weight (V, H), bias (V,) | None, targets (M,))`` -> ``(logp, entropy)``.

    Both outputs are ``(M,)`` in fp32 (fp64 for fp64 inputs). The entropy gradient is computed
    only when the entropy output receives one. The blocks (GEMM dtypes, memory) are those of
    ``mgrpo_fast.ops.chunked``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size):
        gemm = LogitsGemm(hidden, weight, bias, temperature)
        rows = hidden.shape[0]
        logp = torch.empty(rows, dtype=gemm.acc, device=hidden.device)
        entropy = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        for start in range(0, rows, chunk_size):
            sl = slice(start, min(start + chunk_size, rows))
            z = gemm(hidden[sl])  # (chunk, V) fp32: the one large temporary (the statistics reuse it)
            logp[sl], entropy[sl], lse[sl], _ = softmax_stats(z, targets[sl], in_place=True)
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        gemm = LogitsGemm(hidden, weight, bias, ctx.temperature)
        acc = accumulation_dtype(hidden, weight)
        rows = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator across chunks: the weight gradient is never summed in bf16
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        cast = lambda g: None if g is None else g.to(acc)  # noqa: E731
        grad_logp, grad_entropy = cast(grad_logp), cast(grad_entropy)
        for start in range(0, rows, ctx.chunk_size):
            sl = slice(start, min(start + ctx.chunk_size, rows))
            z = gemm(hidden[sl])  # recomputed, as in the forward
            # two (chunk, V) blocks with the entropy gradient (p and z), one without
            p = probs_(z, lse[sl], keep_logits=grad_entropy is not None)
            dz = dlogits_(
                p,
                z,
                targets[sl],
                lse[sl],
                entropy[sl],
                None if grad_logp is None else grad_logp[sl],
                None if grad_entropy is None else grad_entropy[sl],
                ctx.temperature,
            )
            del z, p
            dz = gradient_operand(dz, gemm, hidden[sl], grad_bias)  # 16-bit operands: in place
            gradient_gemms(
                dz, hidden[sl], gemm, None if grad_hidden is None else grad_hidden[sl], grad_weight
            )
            del dz
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        if need_b:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    row_index: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token under ``softmax((hidden @ weight.T + bias) / temperature)``.

    The ``(rows x V)`` logits are never materialized: they are formed one block at a time in fp32.

    Args:
        hidden: ``(..., H)`` hidden states (fp32, bf16, fp16 or fp64).
        weight: ``(V, H)`` lm_head weight.
        targets: ``(...)`` int token ids in ``[0, V)``, same leading shape as ``hidden``.
        bias: optional ``(V,)``.
        temperature: positive; logits are divided by it.
        return_entropy: also return the entropy of each row's distribution.
        row_index: optional ``(M,)`` int indices into the flattened rows of ``hidden``: only those
            rows are computed (e.g. the completion tokens of a packed batch), prompt rows cost nothing.
        chunk_size: rows per logits block of the torch path (default: a ``(chunk, V)`` fp32 block
            of about 96 MiB on CPU, 256 MiB elsewhere; ``mgrpo_fast.ops.chunked``).
        impl: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or ``"triton"``.

    Returns:
        ``logp`` of shape ``(...)`` (or ``(M,)`` with ``row_index``) in fp32 (fp64 for fp64
        inputs), and ``entropy`` of the same shape when ``return_entropy``. Both are differentiable
        with respect to ``hidden``, ``weight`` and ``bias``.
    """
    logp, entropy, _ = linear_logprobs_with_lse(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        row_index=row_index,
        chunk_size=chunk_size,
        impl=impl,
    )
    return (logp, entropy) if return_entropy else logp


def select_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    row_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Validate the arguments of a log-prob computation and pick its rows.

    Returns ``(hidden2d (M, H), targets1d (M,) int64, out_shape)``: the rows to compute (all rows
    of ``hidden (..., H)``, or those of ``row_index``) and the shape the results take. Targets are
    range-checked only on the selected rows, so padding ids (e.g. -100) elsewhere are fine.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_integer("targets", targets)
    check_ndim("hidden", hidden, range(1, 64), "(..., H)")
    check_ndim("weight", weight, (2,), "a 2-D tensor (V, H)")
    vocab, width = weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(
            f"hidden: expected last dim H = {width} (weight is (V, H) = {tuple(weight.shape)}), "
            f"got shape {tuple(hidden.shape)}"
        )
    check_shape("targets", targets, hidden.shape[:-1], "(...) = hidden.shape[:-1]")
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (vocab,), "(V,)")
    check_same_device("hidden", hidden, weight=weight, targets=targets, bias=bias, row_index=row_index)
    check_positive("temperature", temperature)

    out_shape = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, width)
    targets1d = targets.reshape(-1)
    if row_index is not None:
        check_integer("row_index", row_index)
        check_ndim("row_index", row_index, (1,), "a 1-D tensor (M,) of row indices")
        check_index_range("row_index", row_index, hidden2d.shape[0], "number of rows")
        row_index = row_index.long()
        every_row = row_index.numel() == hidden2d.shape[0] and bool(
            torch.equal(row_index, torch.arange(row_index.numel(), device=row_index.device))
        )
        if not every_row:  # all rows in order (e.g. a mask of ones): a view, no copy and no scatter back
            hidden2d = hidden2d.index_select(0, row_index)
            targets1d = targets1d.index_select(0, row_index)
        out_shape = row_index.shape
    check_index_range("targets", targets1d, vocab, "V")
    return hidden2d, targets1d.long(), out_shape


def linear_logprobs_with_lse(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    row_index: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``linear_logprobs`` returning ``(logp, entropy, lse)``; ``lse`` carries no gradient."""
    if chunk_size is not None:
        check_positive("chunk_size", chunk_size)
    hidden2d, targets1d, out_shape = select_rows(hidden, weight, targets, bias, temperature, row_index)
    if choose_impl("linear_logprobs", impl, hidden.device, dtypes=(hidden.dtype, weight.dtype)) == "triton":
        from mgrpo_fast.kernels.linear_logprobs import triton_linear_logprobs

        logp, entropy, lse = triton_linear_logprobs(hidden2d, weight, targets1d, bias, float(temperature))
    else:
        chunk = (
            int(chunk_size)
            if chunk_size is not None
            else default_chunk_size(hidden2d.shape[0], weight.shape[0], hidden.device)
        )
        logp, entropy, lse = ChunkedLinearLogprobs.apply(
            hidden2d, weight, bias, targets1d, float(temperature), chunk
        )
    return logp.reshape(out_shape), entropy.reshape(out_shape), lse.reshape(out_shape)
