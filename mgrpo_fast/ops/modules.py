"""Thin ``nn.Module`` wrappers over the functional API.

``GRPOLoss`` is a drop-in replacement for Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss``: the same
constructor (names, defaults and positional order), the same forward arguments and the same return
value and semantics for every option, so code written for Liger (TRL's ``use_liger_kernel`` path
included) works by swapping the class. ``docs/integrations.md`` lists where the two differ (only in
what Liger computes less exactly or not at all).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch
from torch import nn

from mgrpo_fast.ops.logprobs import linear_logprobs
from mgrpo_fast.ops.loss import fused_linear_grpo_loss
from mgrpo_fast.ops.objective import flatten_batch, grpo_objective
from mgrpo_fast.ops.options import LossOptions

# Functional-API argument names -> the Liger forward's names, so errors name what the caller wrote.
_LIGER_NAMES = {
    "hidden": "_input",
    "weight": "lin_weight",
    "targets": "selected_token_ids",
    "mask": "attention_mask",
    "old_logp": "old_per_token_logps",
    "ref_logp": "ref_per_token_logps",
}
_LIGER_NAME_PATTERN = re.compile(r"\b(" + "|".join(_LIGER_NAMES) + r")\b")
# Liger computes these loss types at token level only (TRL and fused_linear_grpo_loss: both levels).
_LIGER_TOKEN_ONLY = ("cispo", "sapo", "vespo")
# The loss types whose token mean Liger (and TRL) divides by num_items_in_batch.
_NUM_ITEMS_LOSS_TYPES = ("dapo", "cispo", "vespo")


def _in_liger_terms(error: ValueError | TypeError) -> ValueError | TypeError:
    message = _LIGER_NAME_PATTERN.sub(lambda match: _LIGER_NAMES[match.group(1)], str(error))
    return type(error)(message)


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def liger_token_normalizer(
    mask: torch.Tensor, num_items_in_batch: float | torch.Tensor | None
) -> torch.Tensor:
    """The token count Liger divides ``dapo``/``cispo``/``vespo`` by, per process: ``num_items_in_batch``
    (the loss tokens of the whole generation batch, TRL's) over the world size, else the mask sum
    all-reduced over the processes over the world size; at least 1. A 0-dim fp32 tensor."""
    world = _world_size()
    if num_items_in_batch is not None:
        total = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device).reshape(())
    else:
        total = mask.to(torch.float32).sum()
        if world > 1:
            total = total.clone()
            torch.distributed.all_reduce(total)
    return (total / world).clamp(min=1.0)


class GRPOLoss(nn.Module):
    """Fused lm_head + GRPO loss holding its options (Liger 0.8.5's ``LigerFusedLinearGRPOLoss``).

    Args (Liger's, in Liger's positional order):
        beta: KL weight (Liger's default 0.04). With ``beta != 0`` and ``use_ref_model`` the forward
            needs reference log-probs, or ``ref_input``/``ref_weight`` to compute them.
        compiled: accepted; no effect (nothing here is ``torch.compile``-d per call).
        use_ref_model: False: no reference at all, the KL term and its metric are 0 (as in Liger).
        chunk_size: sequences per chunk (Liger's meaning): the loss rows of at most
            ``chunk_size · T`` positions per logits block (torch path) or z-stash chunk (Triton path).
        epsilon_low, epsilon_high, loss_type, max_completion_length, importance_sampling_level,
        sapo_temperature_pos, sapo_temperature_neg: see ``LossOptions``; ``max_completion_length=None``
            with ``dr_grpo`` normalizes by ``T`` (Liger's Triton path's fallback; its chunked path
            refuses it).
        temperature: logits are divided by it.
        delta: dual-clip bound, > 0 (Liger's check); None = off.
        use_bias_correction_kl: the KL term times the importance weight (DeepSeek-V3.2).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: ``vespo``'s Gamma weight.

    Keyword-only extensions: ``kl_estimator`` (``k1 | k2 | k3``; Liger uses k3), ``entropy_coef``
    (entropy bonus; Liger has none) and ``impl`` (``"auto" | "torch" | "triton"``).
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        kl_estimator: str = "k3",
        entropy_coef: float = 0.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.options = LossOptions(
            loss_type=loss_type,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            delta=delta,
            beta=beta,
            kl_estimator=kl_estimator,
            importance_sampling_level=importance_sampling_level,
            max_completion_length=max_completion_length,
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
            vespo_k_pos=vespo_k_pos,
            vespo_lambda_pos=vespo_lambda_pos,
            vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg,
            use_bias_correction_kl=use_bias_correction_kl,
            entropy_coef=entropy_coef,
        )
        # Liger's constructor checks, with the same bounds (after LossOptions' type checks).
        for name, value in (
            ("sapo_temperature_pos", sapo_temperature_pos),
            ("sapo_temperature_neg", sapo_temperature_neg),
        ):
            if not value > 0:
                raise ValueError(f"{name}: expected a positive temperature (as Liger), got {value!r}")
        if delta is not None and not delta > 0:
            raise ValueError(f"delta: expected None or a positive dual-clip bound (as Liger), got {delta!r}")
        if not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ValueError(f"chunk_size: expected a positive int (sequences per chunk), got {chunk_size!r}")
        # Liger's attributes, same names (code that reads them keeps working).
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = float(temperature)  # Liger divides by it: True is 1.0
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        self.impl = impl

    def extra_repr(self) -> str:
        o = self.options
        return f"loss_type={o.loss_type!r}, beta={o.beta}, epsilon=({o.epsilon_low}, {o.epsilon_high})"

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        selected_token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        advantages: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_per_token_logps: torch.Tensor | None = None,
        old_per_token_logps: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        vllm_is_ratio: torch.Tensor | None = None,
        num_items_in_batch: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Liger's forward.

        Args:
            _input: ``(B, T, H)`` (or ``(B*T, H)``) last hidden states of the completion tokens.
            lin_weight: ``(V, H)``; ``bias``: optional ``(V,)``.
            selected_token_ids: ``(B, T)`` sampled token ids.
            attention_mask: ``(B, T)`` completion mask.
            advantages: ``(B,)`` (or ``(B, T)``).
            ref_per_token_logps, old_per_token_logps: optional ``(B, T)``; given both
                ``ref_per_token_logps`` and ``ref_input``, the former is used (with a warning).
            ref_input, ref_weight, ref_bias: reference model's hidden states and head; its
                log-probs are computed without gradient when ``ref_per_token_logps`` is None.
            vllm_is_ratio: sampler correction (truncated importance weights, trainer over sampler
                probability, >= 0 and finite), ``(B, T)`` per token or ``(B,)``/``(B, 1)`` per
                sequence, no gradient: multiplies the policy term, not the KL (vespo: enters its
                weight φ instead).
            num_items_in_batch: ``dapo``/``cispo``/``vespo``: the loss tokens of the whole generation
                batch (over all processes); the loss is divided by it over the world size instead of
                the mask sum (TRL's normalizer).

        Returns:
            ``(loss, (mean_kl, clip_ratio))`` when ``beta != 0``, else ``(loss, (clip_ratio,))``,
            where ``clip_ratio`` is the fraction of masked tokens clipped (either side; 0 for sapo
            and vespo, which do not clip).
        """
        o = self.options
        if o.importance_sampling_level == "sequence" and o.loss_type in _LIGER_TOKEN_ONLY:
            raise ValueError(
                f"importance_sampling_level: Sequence-level importance sampling is not supported for "
                f"loss_type='{o.loss_type}' by LigerFusedLinearGRPOLoss, whose interface GRPOLoss follows; "
                "use importance_sampling_level='token' (fused_linear_grpo_loss computes it, as TRL does)"
            )
        use_ref = self.use_ref_model and o.beta != 0.0
        if self.use_ref_model and ref_per_token_logps is not None and ref_input is not None:
            warnings.warn(
                "Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.",
                stacklevel=2,
            )
        if use_ref and ref_per_token_logps is None and ref_input is None:
            raise ValueError(
                "ref_per_token_logps: required (or ref_input with ref_weight) when use_ref_model=True and "
                f"beta != 0 (beta={o.beta})"
            )
        hidden = _input
        if hidden.dim() == 2 and selected_token_ids.dim() == 2:
            hidden = hidden.reshape(*selected_token_ids.shape, hidden.shape[-1])
        # Liger's luspo sums the per-token loss over every position, padding included; where that
        # loss is one value per sequence this equals the masked sum, computed on the loss rows only.
        per_sequence_loss = (
            o.importance_sampling_level == "sequence"
            and not use_ref
            and (vllm_is_ratio is None or vllm_is_ratio.dim() == 1 or vllm_is_ratio.shape[-1] == 1)
        )
        every_row = o.loss_type == "luspo" and not per_sequence_loss
        ref_logp = ref_per_token_logps if use_ref else None
        if use_ref and ref_logp is None:
            ref_logp = self._reference_logps(
                ref_input, ref_weight, ref_bias, selected_token_ids, attention_mask, every_row
            )
        options = o if use_ref or o.beta == 0.0 else _without_kl(o)
        token_weight = None
        if o.loss_type in _NUM_ITEMS_LOSS_TYPES and (num_items_in_batch is not None or _world_size() > 1):
            normalizer = liger_token_normalizer(attention_mask, num_items_in_batch)
            token_weight = attention_mask.new_ones(attention_mask.shape, dtype=torch.float32) / normalizer
        rows_per_chunk = self.chunk_size * (
            selected_token_ids.shape[-1] if selected_token_ids.dim() == 2 else 1
        )
        try:
            if every_row:
                loss, metrics = self._luspo_every_position(
                    hidden,
                    lin_weight,
                    selected_token_ids,
                    attention_mask,
                    advantages,
                    bias,
                    ref_logp,
                    old_per_token_logps,
                    vllm_is_ratio,
                    options,
                    rows_per_chunk,
                )
            else:
                loss, metrics = fused_linear_grpo_loss(
                    hidden,
                    lin_weight,
                    selected_token_ids,
                    advantages,
                    attention_mask,
                    old_logp=old_per_token_logps,
                    ref_logp=ref_logp,
                    bias=bias,
                    temperature=self.temperature,
                    token_weight=token_weight,
                    vllm_is_ratio=vllm_is_ratio,
                    chunk_size=rows_per_chunk,
                    impl=self.impl,
                    options=options,
                )
        except (ValueError, TypeError) as error:
            raise _in_liger_terms(error) from error
        clip_ratio = metrics["clip_ratio/region_token_mean"]
        if o.beta != 0.0:
            kl = metrics["kl"] if use_ref else torch.zeros_like(clip_ratio)
            return loss, (kl, clip_ratio)
        return loss, (clip_ratio,)

    @torch.no_grad()
    def _reference_logps(
        self, ref_input, ref_weight, ref_bias, targets, mask, every_row: bool
    ) -> torch.Tensor:
        """``(B, T)`` reference log-probs from the reference head, at the masked-in positions (or every
        position for Liger's luspo); 0 elsewhere."""
        if ref_weight is None:
            raise ValueError("ref_weight: required with ref_input to compute reference log-probs")
        ref_hidden = ref_input
        if ref_hidden.dim() == 2 and targets.dim() == 2:
            ref_hidden = ref_hidden.reshape(*targets.shape, ref_hidden.shape[-1])
        rows = None if every_row else torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        ref_rows = linear_logprobs(
            ref_hidden,
            ref_weight,
            targets,
            bias=ref_bias,
            temperature=self.temperature,
            row_index=rows,
            impl=self.impl,
        )
        if rows is None:
            return ref_rows
        return ref_rows.new_zeros(targets.numel()).index_copy(0, rows, ref_rows).reshape(targets.shape)

    def _luspo_every_position(
        self,
        hidden,
        weight,
        targets,
        mask,
        advantages,
        bias,
        ref_logp,
        old_logp,
        vllm_is_ratio,
        options,
        rows,
    ):
        """Liger's luspo: ``Σ_{i,t} M_i ℓ_it / (B · T)`` over every position (padding included, from
        its own values), ``M_i`` the sequence's mask sum (``reference.grpo_loss_ref(reduce_padding=True)``).
        Every row goes through the lm_head: Liger evaluates them all."""
        logp, entropy = linear_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            temperature=self.temperature,
            return_entropy=True,
            chunk_size=rows,
            impl=self.impl,
        )
        if options.entropy_coef == 0.0:
            entropy = entropy.detach()
        batch_size, length = targets.shape
        lengths = mask.to(torch.promote_types(logp.dtype, torch.float32)).sum(-1, keepdim=True)
        token_weight = (lengths / max(batch_size * length, 1)).expand(batch_size, length)
        tokens = {"logp": logp, "old_logp": old_logp, "ref_logp": ref_logp}
        batch = flatten_batch(
            tokens, options, advantages, mask, None, token_weight, vllm_is_ratio, padding_loss=True
        )
        return grpo_objective(logp.reshape(-1), batch, options, entropy.reshape(-1))


def _without_kl(options: LossOptions) -> LossOptions:
    """``options`` with ``beta = 0``: ``use_ref_model=False`` has no reference, so its KL is 0."""
    return dataclasses.replace(options, beta=0.0)
