"""The packed policy update: one batch of training sequences (both MGRPO layers), split into packed
micro-batches, with the loss normalized over the *whole* batch.

Global normalization. The loss types normalize over the batch (``dapo``: all loss tokens; ``grpo``:
tokens of a sequence, then sequences; ``dr_grpo``: sequences x a fixed length). When the batch is cut
into micro-batches (and across ranks) each micro-batch must not normalize by its own counts, or the
accumulated gradient depends on how the batch was packed. Every normalizer here is a per-sequence
constant, so :func:`global_sequence_weights` gives each sequence ``s`` one per-token weight ``w_s``
computed from batch-wide counts (all-reduced over ranks by the caller), and a micro-batch's loss is
``Σ_{tokens t of its sequences} w_s(t) · ℓ_t``. The micro-batch losses then *sum* to the batch loss and
their gradients accumulate to the batch gradient, whatever the packing::

    dapo / bnpo / cispo / vespo:  w_s = λ_s / M          M = Σ_s M_s   (loss tokens of the batch)
    grpo / sapo:          w_s = λ_s / (S · M_s)         S = sequences of the batch
    dr_grpo:              w_s = λ_s / (S · L)           L = max_completion_length, else max_s M_s
    luspo:                w_s = λ_s / S

``λ_s`` is the sequence's loss weight: 1 for layer 1, λ2 (``layer2.loss_weight``) for layer 2. With
``dapo`` the loss is therefore ``(Σ_{layer-1 tokens} ℓ + λ2 Σ_{layer-2 tokens} ℓ) / M``.

Only the rows that predict a trained token go through the lm_head (``PackedMicroBatch.loss_rows``):
the hidden states of those rows are gathered, and the fused GRPO loss runs on them as a packed batch
whose "sequences" are the loss rows of each packed sequence (so GSPO's sequence ratio still sees whole
sequences). Prompt tokens and the layer-1 context of a layer-2 correction cost no lm_head FLOPs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mgrpo_fast.models.policy import lm_head_of, packed_hidden_states
from mgrpo_fast.ops.layout import cu_seqlens_from_lengths
from mgrpo_fast.ops.logprobs import linear_logprobs
from mgrpo_fast.ops.loss import fused_linear_grpo_loss
from mgrpo_fast.ops.options import LOSS_TYPES, LossOptions
from mgrpo_fast.packing.microbatch import PackedMicroBatch, SequenceSpec, build_microbatch

__all__ = [
    "MetricSums",
    "MicroBatchTargets",
    "PackedPolicy",
    "global_sequence_weights",
    "microbatch_targets",
    "padding_microbatch",
]


def global_sequence_weights(
    num_loss_tokens: torch.Tensor,
    loss_weight: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    max_tokens: float | None = None,
) -> torch.Tensor:
    """Per-token weight of every sequence so that micro-batch losses sum to the batch loss.

    Args:
        num_loss_tokens: ``(S,)`` loss tokens ``M_s`` of each (local) sequence.
        loss_weight: ``(S,)`` ``λ_s`` (1 for layer 1, λ2 for layer 2).
        loss_type: one of ``mgrpo_fast.ops.options.LOSS_TYPES``.
        max_completion_length: ``dr_grpo``'s ``L``; None = the longest sequence of the batch.
        total_tokens, total_sequences, max_tokens: the batch-wide ``M``, ``S`` and ``max_s M_s`` over
            all ranks; None = from the local tensors (one process).

    Returns:
        ``(S,)`` float64 weights (module docstring); the caller casts them.
    """
    m = num_loss_tokens.to(torch.float64)
    lam = loss_weight.to(torch.float64)
    if m.shape != lam.shape or m.dim() != 1:
        raise ValueError(
            f"loss_weight: expected shape {tuple(m.shape)} like num_loss_tokens, got {tuple(lam.shape)}"
        )
    total_tokens = float(m.sum()) if total_tokens is None else float(total_tokens)
    total_sequences = float(m.numel()) if total_sequences is None else float(total_sequences)
    seqs = max(total_sequences, 1.0)
    if loss_type in ("grpo", "sapo"):
        return lam / (seqs * m.clamp(min=1.0))
    if loss_type == "luspo":
        return lam / seqs
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            local_max = float(m.max()) if m.numel() else 0.0
            max_completion_length = local_max if max_tokens is None else max_tokens
        return lam / (seqs * max(float(max_completion_length), 1.0))
    if loss_type in ("dapo", "bnpo", "cispo", "vespo"):
        return lam / max(total_tokens, 1.0)
    raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")


@dataclass(frozen=True)
class MicroBatchTargets:
    """What the loss needs for the loss rows ``(L,)`` of one micro-batch, in ``loss_rows`` order.

    Attributes:
        advantages: ``(L,)`` f32, the advantage of each row's sequence.
        token_weight: ``(L,)`` f32, the global weight ``w_s`` of each row's sequence.
        cu_seqlens: ``(S_mb+1,)`` int32 boundaries of the loss rows of each packed sequence.
        old_logp: ``(L,)`` f32 log-probs of the sampling policy, or None (on-policy: ratio 1).
        ref_logp: ``(L,)`` f32 log-probs of the reference model, or None (beta = 0).
        is_ratio: ``(L,)`` f32 sampler correction (truncated importance-sampling weights of the
            rollout engine's log-probs, ``mgrpo_fast.rl.mismatch``) multiplying each row's policy term
            (the loss's ``vllm_is_ratio``; the KL term is not scaled), or None (no correction).
    """

    advantages: torch.Tensor
    token_weight: torch.Tensor
    cu_seqlens: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    is_ratio: torch.Tensor | None = None


def microbatch_targets(
    mb: PackedMicroBatch,
    advantages: torch.Tensor,
    sequence_weight: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> MicroBatchTargets:
    """Gather per-row targets of ``mb`` from per-sequence tensors ``(S,)`` of the whole (local) batch
    (indexed by ``mb.loss_seq``); ``old_logp``/``ref_logp`` are already ``(L,)`` for this micro-batch."""
    seq = mb.loss_seq.cpu()
    # loss rows of one sequence are contiguous and in order (build_microbatch), so run lengths of
    # loss_seq are the per-sequence loss-row counts.
    _, counts = torch.unique_consecutive(seq, return_counts=True)
    return MicroBatchTargets(
        advantages=advantages.to(torch.float32).index_select(0, seq),
        token_weight=sequence_weight.to(torch.float32).index_select(0, seq),
        cu_seqlens=cu_seqlens_from_lengths(counts),
        old_logp=old_logp,
        ref_logp=ref_logp,
    )


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def padding_microbatch(pad_id: int = 0) -> tuple[PackedMicroBatch, MicroBatchTargets]:
    """A 2-token micro-batch with one loss row of weight 0: what a rank with nothing to train runs so
    that it still joins the collectives of the forward and backward (FSDP all-gathers, gradient
    reduce-scatters); its loss and gradient are exactly 0."""
    mb = build_microbatch([SequenceSpec([pad_id], [pad_id])])
    zero = torch.zeros(1)
    return mb, MicroBatchTargets(advantages=zero, token_weight=zero, cu_seqlens=cu_seqlens_from_lengths([1]))


class PackedPolicy(torch.nn.Module):
    """The policy as one module whose ``forward`` covers every use of its parameters in an update.

    ``forward(mb, targets)`` runs the decoder over the packed tokens of ``mb`` (bf16 autocast on CUDA
    when ``autocast_dtype`` is set), gathers the ``L`` loss rows and returns the fused GRPO loss and
    its metrics (never materializing ``(L, V)`` logits); ``forward(mb)`` returns the ``(L,)`` log-probs
    instead (old / reference log-probs, call it under ``torch.no_grad()``). Because the embedding, the
    final norm and the lm_head weight (tied or not) are all used inside this one forward, a sharding
    engine can wrap this module as its root unit: FSDP2 all-gathers those parameters for the forward
    and reduce-scatters their gradients; DeepSpeed ZeRO-3 registers the lm_head weight as an external
    parameter of it (``mgrpo_fast.engines.distributed``).

    Args:
        policy: a transformers causal LM (``policy.lm_head.weight`` is the ``(V, H)`` output matrix).
        options: the loss options; ``temperature``: logits are divided by it; ``impl``: kernel choice.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        options: LossOptions,
        *,
        temperature: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.policy = policy
        self.options, self.temperature, self.autocast_dtype, self.impl = (
            options,
            temperature,
            autocast_dtype,
            impl,
        )

    def forward(self, mb: PackedMicroBatch, targets: MicroBatchTargets | None = None):
        if mb.num_tokens == 0:  # a padding micro-batch: a zero-weight dummy row, same collectives
            pad = getattr(self.policy.config, "pad_token_id", None) or 0
            mb, targets = padding_microbatch(pad)
        device = next(self.policy.parameters()).device
        mb = mb.to(device)
        with _autocast(device, self.autocast_dtype):
            hidden = packed_hidden_states(self.policy, mb)
        rows = hidden.index_select(0, mb.loss_rows)
        head = lm_head_of(self.policy)
        bias = getattr(head, "bias", None)
        if targets is None:
            logp = linear_logprobs(
                rows, head.weight, mb.loss_targets, bias=bias, temperature=self.temperature, impl=self.impl
            )
            return logp.float()
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return fused_linear_grpo_loss(
            rows,
            head.weight,
            mb.loss_targets,
            move(targets.advantages),
            cu_seqlens=move(targets.cu_seqlens),
            old_logp=move(targets.old_logp),
            ref_logp=move(targets.ref_logp),
            bias=bias,
            temperature=self.temperature,
            token_weight=move(targets.token_weight),
            vllm_is_ratio=move(targets.is_ratio),
            impl=self.impl,
            options=self.options,
        )


class MetricSums:
    """Token-weighted sums of per-micro-batch metrics: ``add(metrics, L)`` then ``means()``.

    ``sums()`` exposes the raw ``{name: (Σ value·L, Σ L)}`` so a distributed caller can all-reduce
    both before dividing."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = {}
        self._count: dict[str, float] = {}

    def add(self, metrics: dict[str, torch.Tensor | float], weight: float) -> None:
        if weight <= 0:
            return
        for k, v in metrics.items():
            self._sum[k] = self._sum.get(k, 0.0) + float(v) * weight
            self._count[k] = self._count.get(k, 0.0) + weight

    def sums(self) -> dict[str, tuple[float, float]]:
        return {k: (self._sum[k], self._count[k]) for k in sorted(self._sum)}

    @staticmethod
    def means_of(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {k: s / c for k, (s, c) in sums.items() if c > 0}

    def means(self) -> dict[str, float]:
        return self.means_of(self.sums())

    @staticmethod
    def merge(per_rank: list[dict[str, tuple[float, float]]]) -> dict[str, float]:
        """Means over the ``sums()`` of every rank (token-weighted over the whole batch)."""
        total: dict[str, list[float]] = {}
        for sums in per_rank:
            for k, (s, c) in sums.items():
                acc = total.setdefault(k, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
        return {k: s / c for k, (s, c) in sorted(total.items()) if c > 0}
