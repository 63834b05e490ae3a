"""Thin ``nn.Module`` wrappers over the functional API.

``GRPOLoss`` is a drop-in replacement for Liger-Kernel's ``LigerFusedLinearGRPOLoss``: the same
constructor options and forward arguments and the same return value, so code written for Liger
(TRL's ``use_liger_kernel`` path included) works by swapping the class.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mgrpo_fast.ops.logprobs import linear_logprobs
from mgrpo_fast.ops.loss import fused_linear_grpo_loss
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


def _in_liger_terms(error: ValueError | TypeError) -> ValueError | TypeError:
    message = _LIGER_NAME_PATTERN.sub(lambda match: _LIGER_NAMES[match.group(1)], str(error))
    return type(error)(message)


class GRPOLoss(nn.Module):
    """Fused lm_head + GRPO loss holding its options (Liger-compatible).

    Args:
        beta: KL weight (Liger's default 0.04). With ``beta != 0`` the forward needs reference
            log-probs, or ``ref_input``/``ref_weight`` to compute them (when ``use_ref_model``).
        compiled, chunk_size: accepted for Liger compatibility. ``chunk_size`` here is rows per
            logits block of the torch path (Liger's counts sequences); ``compiled`` has no effect.
        use_ref_model: compute reference log-probs from ``ref_input``/``ref_weight`` when given.
        epsilon_low, epsilon_high, loss_type, max_completion_length, importance_sampling_level,
        delta: see ``LossOptions``.
        temperature: logits are divided by it.
        kl_estimator: ``k1 | k2 | k3`` (extension; Liger uses k3).
        impl: ``"auto" | "torch" | "triton"``.
        use_bias_correction_kl, sapo_*, vespo_*: accepted at their defaults (newer Liger/TRL pass
            them); ``use_bias_correction_kl=True`` raises ``ValueError``.
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
        temperature: float = 1.0,
        delta: float | None = None,
        kl_estimator: str = "k3",
        impl: str = "auto",
        use_bias_correction_kl: bool = False,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
    ) -> None:
        super().__init__()
        # Newer Liger/TRL pass these at their defaults; the sapo/vespo ones only act with loss types
        # this loss does not offer (rejected by LossOptions), the bias-corrected KL is not offered.
        if use_bias_correction_kl:
            raise ValueError("use_bias_correction_kl: True is not supported; pass False (the default)")
        del (
            sapo_temperature_pos,
            sapo_temperature_neg,
            vespo_k_pos,
            vespo_lambda_pos,
            vespo_k_neg,
            vespo_lambda_neg,
        )
        self.options = LossOptions(
            loss_type=loss_type,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            delta=delta,
            beta=beta,
            kl_estimator=kl_estimator,
            importance_sampling_level=importance_sampling_level,
            max_completion_length=max_completion_length,
        )
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.temperature = temperature
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
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Liger's forward.

        Args:
            _input: ``(B, T, H)`` (or ``(B*T, H)``) last hidden states of the completion tokens.
            lin_weight: ``(V, H)``; ``bias``: optional ``(V,)``.
            selected_token_ids: ``(B, T)`` sampled token ids.
            attention_mask: ``(B, T)`` completion mask.
            advantages: ``(B,)`` or ``(B, T)``.
            ref_per_token_logps, old_per_token_logps: optional ``(B, T)``.
            ref_input, ref_weight, ref_bias: reference model's hidden states and head; its
                log-probs are computed without gradient when ``ref_per_token_logps`` is None.
            vllm_is_ratio: accepted for Liger's signature; only None is supported.

        Returns:
            ``(loss, (mean_kl, clip_ratio))`` when ``beta != 0``, else ``(loss, (clip_ratio,))``,
            where ``clip_ratio`` is the fraction of masked tokens clipped (either side).
        """
        if vllm_is_ratio is not None:
            raise ValueError(
                "vllm_is_ratio: the sampler importance-sampling correction is not supported; pass None"
            )
        hidden = _input
        if hidden.dim() == 2 and selected_token_ids.dim() == 2:
            hidden = hidden.reshape(*selected_token_ids.shape, hidden.shape[-1])
        ref_logp = ref_per_token_logps
        if ref_logp is None and self.use_ref_model and ref_input is not None and self.options.beta != 0.0:
            if ref_weight is None:
                raise ValueError("ref_weight: required with ref_input to compute reference log-probs")
            ref_hidden = ref_input
            if ref_hidden.dim() == 2 and selected_token_ids.dim() == 2:
                ref_hidden = ref_hidden.reshape(*selected_token_ids.shape, ref_hidden.shape[-1])
            with torch.no_grad():  # only the masked-in rows: padding costs nothing
                rows = torch.nonzero(attention_mask.reshape(-1), as_tuple=True)[0]
                ref_rows = linear_logprobs(
                    ref_hidden,
                    ref_weight,
                    selected_token_ids,
                    bias=ref_bias,
                    temperature=self.temperature,
                    row_index=rows,
                    impl=self.impl,
                )
                ref_logp = ref_rows.new_zeros(selected_token_ids.numel()).index_copy(0, rows, ref_rows)
                ref_logp = ref_logp.reshape(selected_token_ids.shape)
        try:
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
                impl=self.impl,
                options=self.options,
            )
        except (ValueError, TypeError) as error:
            raise _in_liger_terms(error) from error
        clip_ratio = metrics["clip_ratio/region_token_mean"]
        if self.options.beta != 0.0:
            return loss, (metrics["kl"], clip_ratio)
        return loss, (clip_ratio,)
