"""The options of the GRPO objective, in one validated object passed from the config to the kernels.

Names and meanings follow TRL's ``GRPOConfig`` and Liger-Kernel's ``LigerFusedLinearGRPOLoss``; the
formulas are in :mod:`mgrpo_fast.reference` (the executable spec) and ``docs/algorithm.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypedDict

from mgrpo_fast.ops.validation import check_choice, check_finite_number, check_positive

__all__ = [
    "ADVANTAGE_SCALES",
    "CLIP_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "LossOptionFields",
    "LossOptions",
    "TOKEN_MEAN_LOSS_TYPES",
    "options_from_call",
]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
"""Surrogate and reduction of the loss (``docs/algorithm.md``; formulas: ``reference.grpo_loss_ref``)."""
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")
"""What the centered rewards are divided by: the group's std, the batch's std, nothing (Dr. GRPO)."""
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""The loss types whose surrogate is the clipped ``-min(r A, clip(r) A)`` (the others: cispo, sapo, vespo)."""
TOKEN_MEAN_LOSS_TYPES = ("bnpo", "dapo", "cispo", "vespo")
"""The loss types reduced by ``Σ m ℓ / max(1, M)`` (``M`` the mask sum; TRL's global-token count for
dapo/cispo/vespo, ``num_items_in_batch``, is a caller-given normalizer)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossOptions:
    """Options of the GRPO objective (same names and meanings as TRL's ``GRPOConfig`` and Liger).

    Bounds are TRL's: every number is accepted where the formula is defined (finite; the SAPO
    temperatures non-zero, as they divide), so a configuration TRL accepts is accepted here.

    Attributes:
        loss_type: ``grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo`` (surrogate and
            reduction; ``docs/algorithm.md``).
        epsilon_low: lower clip, ratio >= 1 - epsilon_low.
        epsilon_high: upper clip, ratio <= 1 + epsilon_high; for ``cispo`` the absolute cap of the
            detached IS weight (e.g. 5.0).
        delta: dual-clip bound on the unclipped branch (``min(ratio, delta)``, TRL's two-sided
            clipping; TRL recommends > 1 + epsilon_high); None = off. Clip loss types only.
        beta: KL weight; 0 skips the reference model entirely.
        kl_estimator: ``k1 | k2 | k3`` estimator of KL(policy || reference).
        importance_sampling_level: ``token`` (PPO/GRPO) or ``sequence`` (GSPO: the ratio is the
            exp of the masked mean log-ratio of the sequence).
        max_completion_length: the ``L`` of ``dr_grpo``'s ``B * L`` normalizer; None = the
            longest sequence of the batch (``T`` when padded; Liger's fallback).
        sapo_temperature_pos, sapo_temperature_neg: ``sapo``'s gate temperatures for tokens with
            positive / non-positive advantage.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: ``vespo``'s Gamma weight
            ``φ(w) = e^λ w^k e^{-λ w}`` for sequences with advantage >= 0 / < 0.
        use_bias_correction_kl: multiply the KL term by the (differentiable, unclipped) importance
            weight (DeepSeek-V3.2; TRL's default is True, Liger's False).
        entropy_coef: entropy bonus, ``loss -= entropy_coef · (token mean of the entropy)``; its
            gradient flows through the entropy the log-prob kernels produce.
    """

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    use_bias_correction_kl: bool = False
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        for name in (
            "epsilon_low",
            "epsilon_high",
            "beta",
            "vespo_k_pos",
            "vespo_lambda_pos",
            "vespo_k_neg",
            "vespo_lambda_neg",
            "entropy_coef",
        ):
            check_finite_number(name, getattr(self, name))
        if self.delta is not None:
            check_finite_number("delta", self.delta, "None or a finite number (the dual-clip bound)")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            check_finite_number(name, getattr(self, name))
            if getattr(self, name) == 0:
                raise ValueError(f"{name}: expected a non-zero number (the SAPO gate divides by it), got 0")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(
                f"use_bias_correction_kl: expected True or False, got {self.use_bias_correction_kl!r}"
            )
        if self.max_completion_length is not None:
            check_positive("max_completion_length", self.max_completion_length)


class LossOptionFields(TypedDict, total=False):
    """The fields of :class:`LossOptions` as keyword arguments of the functional API
    (``grpo_loss(..., loss_type="grpo", beta=0.04)``), for static type checkers; the defaults and
    checks are ``LossOptions``'."""

    loss_type: str
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    beta: float
    kl_estimator: str
    importance_sampling_level: str
    max_completion_length: int | None
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    use_bias_correction_kl: bool
    entropy_coef: float


def options_from_call(
    function: str, options: LossOptions | None, fields: Mapping[str, object]
) -> LossOptions:
    """The one ``LossOptions`` of a call to ``function``, which takes ``options=`` and/or the fields as
    keywords (``fields``: the keywords the caller wrote, nothing else).

    * keywords only (or nothing): ``LossOptions(**fields)``, each field checked, its defaults elsewhere;
    * ``options`` only: ``options`` itself;
    * both: a keyword equal to the options' value is redundant and allowed; one that differs raises
      ``ValueError`` naming it (nothing silently wins);
    * a keyword that is no field of ``LossOptions``: ``TypeError``, as Python says for a bad keyword.
    """
    names = [f.name for f in dataclasses.fields(LossOptions)]
    unknown = [name for name in fields if name not in names]
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    if options is None:
        return LossOptions(**fields)
    if not isinstance(options, LossOptions):
        raise TypeError(f"options: expected a LossOptions or None, got {type(options).__name__}")
    for name, value in fields.items():
        if value != getattr(options, name):
            raise ValueError(
                f"{name}: got {name}={value!r} and options.{name}={getattr(options, name)!r}; "
                f"pass {name} in one place (the keyword or options=)"
            )
    return options
