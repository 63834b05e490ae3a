"""The options of the GRPO objective, in one validated object passed from the config to the kernels.

Names and meanings follow TRL's ``GRPOConfig`` and Liger-Kernel's ``LigerFusedLinearGRPOLoss``; the
formulas are in :mod:`mgrpo_fast.reference` (the executable spec) and ``docs/algorithm.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypedDict

from mgrpo_fast.ops.validation import check_choice, check_non_negative, check_positive

__all__ = [
    "ADVANTAGE_SCALES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "LossOptionFields",
    "LossOptions",
    "options_from_call",
]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
"""Reduction and surrogate of the loss (``docs/algorithm.md``)."""
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")
"""What the centered rewards are divided by: the group's std, the batch's std, nothing (Dr. GRPO)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossOptions:
    """Options of the GRPO objective (same names and meanings as TRL's ``GRPOConfig`` and Liger).

    Attributes:
        loss_type: ``grpo | bnpo | dr_grpo | dapo | cispo`` (reduction and surrogate; see README).
        epsilon_low: lower clip, ratio >= 1 - epsilon_low.
        epsilon_high: upper clip, ratio <= 1 + epsilon_high; for ``cispo`` the absolute cap of the
            detached IS weight (e.g. 5.0).
        delta: dual-clip bound on the unclipped branch (``min(ratio, delta)``), > 1; None = off.
        beta: KL weight; 0 skips the reference model entirely.
        kl_estimator: ``k1 | k2 | k3`` estimator of KL(policy || reference).
        importance_sampling_level: ``token`` (PPO/GRPO) or ``sequence`` (GSPO: the ratio is the
            exp of the masked mean log-ratio of the sequence).
        max_completion_length: the ``L`` of ``dr_grpo``'s ``B * L`` normalizer; None = the
            longest sequence of the batch (``T`` when padded).
    """

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        check_non_negative("epsilon_low", self.epsilon_low)
        check_non_negative("epsilon_high", self.epsilon_high)
        check_non_negative("beta", self.beta)
        if self.loss_type != "cispo" and self.epsilon_low >= 1.0:
            raise ValueError(f"epsilon_low: expected a value in [0, 1), got {self.epsilon_low!r}")
        if self.delta is not None and not (isinstance(self.delta, (int, float)) and self.delta > 1.0):
            raise ValueError(
                f"delta: expected None or a number > 1 (the dual-clip bound), got {self.delta!r}"
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
