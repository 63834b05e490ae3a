"""The clipped GRPO loss: on given log-probs (``grpo_loss``) or fused with the lm_head
(``fused_linear_grpo_loss``, which never materializes the ``[tokens x vocab]`` logits).

Both accept two layouts:

* padded: token tensors ``(B, T)``, ``hidden (B, T, H)``, ``mask (B, T)``, ``advantages (B,)`` or ``(B, T)``;
* packed: token tensors ``(N,)``, ``hidden (N, H)``, ``cu_seqlens (S+1,)`` int32 sequence
  boundaries, ``mask (N,)``, ``advantages (S,)`` or ``(N,)``.

and the loss options either as one ``options=LossOptions(...)`` or as its fields, keywords of the
call (``loss_type="grpo", beta=0.04``); both at once is fine where they agree. The formulas of every
loss type are in ``reference.grpo_loss_ref`` (the executable spec) and ``docs/algorithm.md``. Each call
validates the batch into flat rows (``objective.flatten_batch``), asks ``dispatch.choose_impl`` which
path serves it, and runs the torch objective (``objective``) or the Triton glue (``fused_triton``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mgrpo_fast.ops.dispatch import choose_impl
from mgrpo_fast.ops.fused_torch import fused_loss_torch, one_pass_serves
from mgrpo_fast.ops.fused_triton import fused_loss_triton, token_loss_triton
from mgrpo_fast.ops.logprobs import linear_logprobs
from mgrpo_fast.ops.objective import flatten_batch, grpo_objective
from mgrpo_fast.ops.options import LossOptionFields, LossOptions, options_from_call
from mgrpo_fast.ops.validation import check_float, check_tensor

if TYPE_CHECKING:  # the keyword form of the options, for static type checkers
    from typing_extensions import Unpack


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    vllm_is_ratio: torch.Tensor | None = None,
    impl: str = "auto",
    options: LossOptions | None = None,
    **option_fields: Unpack[LossOptionFields],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO loss on per-token log-probs.

    Args:
        logp: ``(B, T)`` padded or ``(N,)`` packed log-probs of the current policy (differentiable).
        old_logp: like ``logp``, from the sampling policy; ``None`` = on-policy (ratio exactly 1).
        ref_logp: like ``logp``, from the frozen reference; needed when ``beta != 0``.
        advantages: ``(B,)``/``(S,)`` per sequence or like ``logp`` per token. Must be finite.
        mask: like ``logp``; 1 where the token carries the loss. ``None`` = all tokens.
        cu_seqlens: ``(S+1,)`` int sequence boundaries: selects the packed layout.
        entropy: optional, like ``logp``: the ``entropy`` metric; required (and differentiated)
            when ``entropy_coef != 0``: the bonus ``-entropy_coef · Σ m H / max(1, M)``.
        token_weight: optional, like ``logp``, >= 0: the reduction weights, ``loss = Σ weight · mask · ℓ``,
            replacing the loss type's normalization (for a batch split into micro-batches: pass the
            weights of the whole batch, and the micro-batch losses sum to its loss); the entropy
            bonus then takes the same weights.
        vllm_is_ratio: optional sampler correction ``v >= 0`` (truncated importance sampling: the
            trainer's over the sampler's probability of each token, clipped by the caller; TRL's
            ``importance_sampling_ratio``, Liger's ``vllm_is_ratio``), like ``logp`` per token or
            ``(B,)``/``(B, 1)``/``(S,)`` per sequence, no gradient. It multiplies the policy term of
            every loss type (not the KL); for ``vespo`` it enters the weight ``φ`` instead.
        impl: ``"auto" | "torch" | "triton"``; Triton (one elementwise kernel) serves token-level
            importance sampling with fp32/bf16/fp16 log-probs, GSPO and fp64 stay on torch autograd
            (``dispatch.choose_impl``).
        options: the loss options as one ``LossOptions``; None = its defaults.
        loss_type, epsilon_low, epsilon_high, delta, beta, kl_estimator, importance_sampling_level,
        max_completion_length, sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos,
        vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, use_bias_correction_kl, entropy_coef: the
            fields of ``LossOptions`` (same defaults and checks), as keywords; with ``options`` each
            must equal the options' value (``ValueError`` otherwise).

    Returns:
        ``(loss, metrics)``: a 0-dim loss (fp32, or fp64 for fp64 inputs) and a dict of detached
        0-dim tensors: ``ratio``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean``, ``clip_ratio/region_token_mean``, ``kl`` (when ``ref_logp`` is
        given), ``entropy`` (when given), ``vespo/phi_seq_mean`` (vespo).
    """
    options = options_from_call("grpo_loss", options, option_fields)
    check_float("logp", logp)
    tokens = {"logp": logp, "old_logp": old_logp, "ref_logp": ref_logp, "entropy": entropy}
    batch = flatten_batch(tokens, options, advantages, mask, cu_seqlens, token_weight, vllm_is_ratio)
    logp, entropy = logp.reshape(-1), None if entropy is None else entropy.reshape(-1)
    path = choose_impl(
        "grpo_loss",
        impl,
        logp.device,
        dtypes=(logp.dtype,),
        importance_sampling_level=options.importance_sampling_level,
        loss_type=options.loss_type,
    )
    if path == "triton":
        return token_loss_triton(logp, batch, options, entropy)
    return grpo_objective(logp, batch, options, entropy)


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
    token_weight: torch.Tensor | None = None,
    vllm_is_ratio: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
    options: LossOptions | None = None,
    **option_fields: Unpack[LossOptionFields],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lm_head + log-softmax + clipped GRPO loss in one pass, never materializing the logits.

    Only rows with a non-zero ``mask`` are computed (prompt and padding rows cost nothing).

    Args:
        hidden: ``(B, T, H)`` padded or ``(N, H)`` packed final hidden states (differentiable).
        weight: ``(V, H)`` lm_head weight (differentiable); ``bias``: optional ``(V,)``.
        targets: ``(B, T)`` or ``(N,)`` int ids of the sampled tokens, in ``[0, V)`` where masked in.
        advantages, mask, cu_seqlens, old_logp, ref_logp, token_weight, vllm_is_ratio: as in
            ``grpo_loss`` (token tensors shaped like ``targets``).
        temperature: the sampling temperature; logits are divided by it.
        chunk_size: bound on the loss rows per chunk: rows per ``(chunk, V)`` fp32 logits block of
            the torch path, rows per fp32 z-stash chunk of the one-pass Triton path
            (``docs/kernels.md``); None = about 256 MiB (torch) / 1 GiB (Triton) per block.
        impl: ``"auto" | "torch" | "triton"``: the one-pass Triton path serves token-level
            importance sampling on fp32/bf16/fp16 operands of one dtype; GSPO and vespo take log-probs
            from ``linear_logprobs`` (Triton on CUDA) and the loss from torch (``dispatch.choose_impl``).
        options and the ``LossOptions`` fields as keywords: the loss options, as in ``grpo_loss``.
            The entropy bonus (``entropy_coef``) differentiates the entropy the log-prob pass
            computes anyway: no extra logits pass.

    Returns:
        ``(loss, metrics)`` as ``grpo_loss``, with the ``entropy`` metric always present.
    """
    options = options_from_call("fused_linear_grpo_loss", options, option_fields)
    check_tensor("targets", targets)
    check_tensor("hidden", hidden)
    if hidden.shape[:-1] != targets.shape or hidden.dim() != targets.dim() + 1:
        raise ValueError(
            f"hidden: expected shape targets.shape + (H,) = {tuple(targets.shape)} + (H,), "
            f"got {tuple(hidden.shape)}"
        )
    tokens = {"targets": targets, "old_logp": old_logp, "ref_logp": ref_logp}
    batch = flatten_batch(tokens, options, advantages, mask, cu_seqlens, token_weight, vllm_is_ratio)
    rows = torch.nonzero(batch.mask, as_tuple=True)[0]
    path = choose_impl(
        "fused_linear_grpo_loss",
        impl,
        hidden.device,
        dtypes=(hidden.dtype, weight.dtype),
        importance_sampling_level=options.importance_sampling_level,
        loss_type=options.loss_type,
    )
    if path == "triton":
        return fused_loss_triton(hidden, weight, targets, bias, temperature, rows, batch, options, chunk_size)
    if one_pass_serves(options):
        # a row-local objective: the one-pass torch path (fused_torch), 6·N·H·V FLOPs
        return fused_loss_torch(hidden, weight, targets, bias, temperature, rows, batch, options, chunk_size)
    # Two stages: the log-probs of the loss rows (``linear_logprobs`` chooses its own path), then the
    # torch objective on all N rows (masked-out rows hold 0 and are ignored).
    logp_rows, entropy_rows = linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        return_entropy=True,
        row_index=rows,
        chunk_size=chunk_size,
        impl=impl,
    )
    num_tokens = batch.layout.num_tokens
    logp = logp_rows.new_zeros(num_tokens).index_copy(0, rows, logp_rows)
    if options.entropy_coef == 0.0:  # the entropy is a metric only: no gradient through it
        entropy_rows = entropy_rows.detach()
    entropy = entropy_rows.new_zeros(num_tokens).index_copy(0, rows, entropy_rows)
    return grpo_objective(logp, batch, options, entropy)
