"""TRL drop-in: ``FusedGRPOTrainer``, TRL's ``GRPOTrainer`` with the loss of ``fused_linear_grpo_loss``.

Swap one import::

    from mgrpo_fast.integrations.trl import FusedGRPOTrainer as GRPOTrainer

Everything else stays TRL's (generation, rewards, advantages with ``scale_rewards``, reference and old
log-probs, batching over ``steps_per_generation`` / ``num_iterations``, logging, checkpoints). Only the
loss changes: the policy runs its backbone, and the loss is computed from the last hidden states of the
completion tokens and ``lm_head.weight`` by ``fused_linear_grpo_loss``, so the ``[tokens x vocab]``
logits are never built (TRL >= 1.15 computes per-token log-probs with its own chunked head and then
the loss in plain torch; earlier releases build the logits). ``GRPOConfig`` fields keep their TRL
meaning; the metrics keep TRL's names. Numerics: the logits stay fp32 here; under bf16 autocast
(``GRPOConfig``'s default ``bf16=True``) TRL's head rounds its logits tiles to bf16, so the two agree
to bf16 rounding there, and to fp32 rounding in fp32.

The exact loss TRL computes, and what this module passes (``S = Σ_{t in mask} ℓ_t``, ``M`` = mask
sum of this micro-batch, ``B`` its sequences, ``G`` = ``current_gradient_accumulation_steps`` in
training and 1 in eval, ``K`` = ``steps_per_generation`` in training and 1 in eval, ``P`` =
``num_processes``, ``N`` = ``num_items_in_batch``, the mask sum of the whole generation batch over all
processes):

* ``grpo``, ``sapo``: TRL ``(1/B) Σ_i S_i / max(1, M_i) / G``  = fused loss ``/ G``;
* ``bnpo``:    TRL ``S / max(1, M) / G``                = fused ``bnpo`` loss ``/ G``;
* ``dr_grpo``: TRL ``S / (B · max_completion_length) / G`` = fused ``dr_grpo`` loss (with
  ``max_completion_length``) ``/ G``;
* ``luspo``:   TRL ``(1/B) Σ_i S_i / G``                = fused ``luspo`` loss ``/ G`` (TRL 1.16's masked
  form);
* ``dapo``, ``cispo``, ``vespo``: TRL ``S / (max(1, N) / P · G / K)``; the fused loss is
  ``S / max(1, M)``, so it is multiplied by ``max(1, M) / (max(1, N) / P · G / K)``. Summed over the
  ``K`` micro-batches of a generation batch and the ``P`` processes (gradients are averaged over
  processes), each token weighs ``1 / N`` per optimizer step when ``G = K``: the token mean of the
  whole generation batch.

TRL's vLLM importance-sampling ratio (``use_vllm`` + ``vllm_importance_sampling_correction``) is the
loss's ``vllm_is_ratio`` (it multiplies the policy term; ``vespo`` folds it into its weight). The
off-policy sequence mask (``off_policy_mask_threshold``) and the high-entropy token mask
(``top_entropy_quantile``) are non-negative and carry no gradient, so they are folded into per-token
advantages: every policy term is ``f(r, A) · w = f(r, A w)`` for ``w >= 0`` (linear in ``A``, and sapo's
and vespo's choice of parameters by the sign of ``A`` is that of ``A w`` wherever ``w > 0``); the KL
term is not multiplied, as in TRL. The clip metrics are computed from the original advantages.

The KL term (``beta != 0``) is TRL's k3, times the importance weight when ``use_bias_correction_kl``
(TRL's default), in the same fused pass. The entropy bonus (``entropy_coef``, and Skywork-OR1's
adaptive control with ``use_adaptive_entropy``) is TRL's: ``- c · (token mean of the entropy) / G``
whatever the loss type, ``c`` gated and updated per optimizer step exactly as TRL does (same state,
same checkpoint file); its gradient flows through the entropy the fused pass computes anyway. With
``top_entropy_quantile < 1`` the bonus is a mean over the kept tokens only, a mask the policy term
does not share, so that one combination takes two stages, still without logits:
``linear_logprobs`` (differentiable, chunked) then ``grpo_loss`` plus the bonus.

Fields and features the fused loss cannot honor raise ``ValueError`` at construction, naming the field
and why: ``dr_grpo`` without ``max_completion_length`` (TRL itself fails there, at the first loss:
``B * None``), the MoE router auxiliary loss (``router_aux_loss_coef != 0`` on an MoE model), models
with ``final_logit_softcapping`` or a non-positive logit scale, and DeepSpeed ZeRO-3.

Supported TRL: ``>= 1.10, < 1.17`` (the tests passed with 1.10.0, 1.11.0, 1.12.0, 1.13.0, 1.14.2,
1.15.0 and 1.16.0 for grpo/bnpo/dr_grpo/dapo/cispo; the sapo/luspo/vespo loss types and the entropy
terms are checked against 1.16.0, the version CI installs, and read their ``GRPOConfig`` fields only
where they exist). Another version raises ``ImportError`` at import; ``MGRPO_FAST_TRL_UNCHECKED=1``
skips the check.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from contextlib import nullcontext
from typing import Any

import torch

from mgrpo_fast.ops.dispatch import IMPLS
from mgrpo_fast.ops.logprobs import linear_logprobs
from mgrpo_fast.ops.loss import fused_linear_grpo_loss, grpo_loss
from mgrpo_fast.ops.options import CLIP_LOSS_TYPES, LossOptions
from mgrpo_fast.ops.validation import check_choice

TRL_MIN_VERSION = (1, 10)
TRL_MAX_VERSION = (1, 16)  # inclusive: every 1.16.x release
SUPPORTED_TRL = ">=1.10,<1.17"
UNCHECKED_ENV = "MGRPO_FAST_TRL_UNCHECKED"
# The loss types TRL divides by its count of the generation batch's tokens (num_items_in_batch).
GLOBAL_TOKEN_MEAN_LOSS_TYPES = ("dapo", "cispo", "vespo")
# Inputs of vision-language batches that TRL's `_compute_loss` hands to the model as they are.
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def check_trl_version(version: str) -> None:
    """Raise ``ImportError`` unless ``version`` is a supported TRL release (``SUPPORTED_TRL``)."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release[:2]
    except InvalidVersion as exc:
        raise ImportError(f"mgrpo_fast.integrations.trl: cannot parse the TRL version {version!r}") from exc
    if not TRL_MIN_VERSION <= release <= TRL_MAX_VERSION:
        raise ImportError(
            f"mgrpo_fast.integrations.trl supports trl{SUPPORTED_TRL} (it overrides GRPOTrainer's loss, "
            f"whose internals change between releases), but trl {version} is installed. Install a supported "
            f"release (pip install 'trl{SUPPORTED_TRL}'), or set {UNCHECKED_ENV}=1 to skip this check at "
            "your own risk."
        )


try:
    import trl
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        f"mgrpo_fast.integrations.trl needs TRL: pip install 'trl{SUPPORTED_TRL}' ({exc})"
    ) from exc

if not os.environ.get(UNCHECKED_ENV):
    check_trl_version(trl.__version__)

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanmax, nanmin  # noqa: E402

try:
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError:  # pragma: no cover - present in every supported release

    def maybe_gather_lm_head_ctx(*params):
        return nullcontext()


__all__ = [
    "FusedGRPOTrainer",
    "SUPPORTED_TRL",
    "check_trl_version",
    "loss_options_of",
    "trl_loss_options",
    "unsupported_config_fields",
]


def loss_options_of(args: GRPOConfig) -> LossOptions:
    """The ``LossOptions`` a ``GRPOConfig`` means, read as ``GRPOTrainer`` reads it (``epsilon_low =
    epsilon``; ``epsilon_high`` defaults to ``epsilon``; see :func:`trl_loss_options`). Raises
    ``ValueError`` naming the option where ``LossOptions`` rejects a value."""
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    return trl_loss_options(
        args.loss_type,
        args.epsilon,
        epsilon_high,
        args.delta,
        args.beta,
        args.importance_sampling_level,
        args.max_completion_length,
        args,
    )


# GRPOConfig fields that are LossOptions fields of the same name and meaning, with their defaults
# where an older TRL has no such field.
_PASSED_THROUGH = {
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "use_bias_correction_kl": False,
}


def trl_loss_options(
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    beta: float,
    importance_sampling_level: str,
    max_completion_length: int | None,
    args: GRPOConfig | None = None,
    entropy_coef: float = 0.0,
) -> LossOptions:
    """TRL's loss settings (the ``GRPOTrainer`` attributes of the same names, ``delta`` and the
    sapo/vespo/KL-correction fields from its ``args``) as the ``LossOptions`` that computes TRL's
    loss: only the clip loss types have a dual clip (TRL ignores ``delta`` elsewhere),
    ``max_completion_length`` normalizes ``dr_grpo`` only (elsewhere it is a generation length), the
    KL estimator is TRL's ``k3`` and ``entropy_coef`` is the bonus's coefficient in the fused loss's
    own scale (``FusedGRPOTrainer`` converts TRL's)."""
    passed = {name: getattr(args, name, default) for name, default in _PASSED_THROUGH.items()}
    return LossOptions(
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta if loss_type in CLIP_LOSS_TYPES else None,
        beta=beta,
        kl_estimator="k3",
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length if loss_type == "dr_grpo" else None,
        entropy_coef=entropy_coef,
        **passed,
    )


def unsupported_config_fields(args: GRPOConfig) -> list[str]:
    """One message per ``GRPOConfig`` field (value) the fused loss cannot honor; empty when all can."""
    problems = []
    if args.loss_type == "dr_grpo" and args.max_completion_length is None:
        problems.append(
            "max_completion_length=None: loss_type='dr_grpo' normalizes by B * max_completion_length "
            "(trl.GRPOTrainer fails there too, at the first loss)"
        )
    try:
        loss_options_of(args)
    except ValueError as exc:  # names the option (epsilon_low = GRPOConfig.epsilon)
        problems.append(str(exc).replace("epsilon_low:", "epsilon (epsilon_low):", 1))
    return problems


def _logit_scale(model: torch.nn.Module) -> float:
    """The factor the model multiplies its logits by (1.0 for most); rejects soft-capped logits.

    Read from the config as TRL's fused head does (``logit_scale``, ``output_multiplier``,
    ``lm_head_multiplier``, ``1 / logits_scaling``); folded into the temperature: ``z = s·hW / T =
    hW / (T / s)``.
    """
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(
            f"model.config.final_logit_softcapping={softcap!r}: soft-capped logits are not supported by the "
            "fused loss; use trl.GRPOTrainer for this model"
        )
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1.0 / config.logits_scaling
    scale = 1.0 if scale is None else float(scale)
    if not scale > 0.0:
        raise ValueError(
            f"model.config logit scale {scale!r}: the fused loss folds the logit scale into the temperature, "
            "which needs a positive scale; use trl.GRPOTrainer for this model"
        )
    return scale


def _backbone_attr(model: torch.nn.Module) -> str:
    """Where the backbone (the model without its lm_head) lives, as in TRL's fused head."""
    import transformers
    from packaging.version import Version

    if model.config.get_text_config() is not model.config and Version(transformers.__version__) < Version(
        "5"
    ):
        return "model"
    return "base_model"


def _install_fused_forward(model: torch.nn.Module) -> None:
    """Let ``model(..., mgrpo_fast_loss=fn)`` run the backbone and return ``fn(last_hidden, lm_head)``.

    The loss runs inside the model's forward, so DDP/FSDP wrappers see one forward as usual (and
    FSDP2 gathers the head there). Without ``mgrpo_fast_loss`` the previous forward runs unchanged
    (generation, TRL's own log-prob passes for the old and reference policies).
    """
    if getattr(model, "_mgrpo_fast_forward", False):
        return
    previous = model.forward
    backbone_attr = _backbone_attr(model)

    # Keep the original signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, mgrpo_fast_loss=None, **kwargs):
        if mgrpo_fast_loss is None:
            return previous(*args, **kwargs)
        for key in ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "fused_lm_head"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        outputs = getattr(self, backbone_attr)(*args, **kwargs)
        return mgrpo_fast_loss(outputs.last_hidden_state, self.get_output_embeddings())

    model.forward = types.MethodType(forward, model)
    model._mgrpo_fast_forward = True


def _full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """FSDP2 shards parameters as DTensors; the fused loss needs the whole head."""
    if t is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


class FusedGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose loss is ``mgrpo_fast.fused_linear_grpo_loss`` (no logits built).

    Takes the arguments of ``trl.GRPOTrainer``, plus:

    Args:
        fused_impl: ``"auto" | "torch" | "triton"``: implementation of the fused loss (``auto``: the
            Triton kernels for CUDA tensors, the chunked torch path otherwise).
        fused_chunk_size: rows per logits block of the torch path (None: about 64 M logits).

    ``GRPOConfig`` fields used by the loss, with TRL's meaning: ``loss_type`` (grpo, bnpo, dr_grpo,
    dapo, cispo, sapo, luspo, vespo), ``epsilon``, ``epsilon_high``, ``delta``, ``beta`` (k3 KL to the
    reference, whose log-probs TRL computes), ``use_bias_correction_kl``, ``sapo_temperature_*``,
    ``vespo_*``, ``temperature``, ``importance_sampling_level``, ``max_completion_length``
    (``dr_grpo``'s normalizer), ``num_iterations`` / ``steps_per_generation`` (TRL provides the old
    log-probs when they differ from the current ones; the ratio is exactly 1 otherwise),
    ``entropy_coef``, ``use_adaptive_entropy`` and ``entropy_coef_min/max/delta``, ``entropy_target``,
    ``cast_lm_head_to_fp32``, ``top_entropy_quantile``, ``off_policy_mask_threshold``,
    ``use_vllm`` + ``vllm_importance_sampling_correction``. ``scale_rewards`` acts on the advantages,
    which TRL computes before the loss, unchanged.

    Logged metrics, with TRL's names and formulas: ``kl`` (when ``beta != 0``), ``entropy``,
    ``clip_ratio/low_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max``,
    ``clip_ratio/region_mean`` (clip loss types), ``cispo_clip_ratio`` (cispo),
    ``vespo/phi_seq_mean`` (vespo), ``policy_loss`` and ``entropy_coef`` (with the entropy bonus).
    When old log-probs exist for the clip metrics (or a mask needs the current log-probs /
    entropies), one extra forward-only pass of the fused head over the loss tokens provides the
    per-token values (``2·N·H·V`` flops, a third of the loss's).
    """

    def __init__(
        self, *args: Any, fused_impl: str = "auto", fused_chunk_size: int | None = None, **kwargs: Any
    ):
        check_choice("fused_impl", fused_impl, IMPLS)
        if fused_chunk_size is not None and not (isinstance(fused_chunk_size, int) and fused_chunk_size > 0):
            raise ValueError(f"fused_chunk_size: expected None or a positive int, got {fused_chunk_size!r}")
        bound = inspect.signature(GRPOTrainer.__init__).bind_partial(None, *args, **kwargs).arguments
        config = bound.get("args")
        if config is not None:  # fail before loading models and datasets
            self._raise_unsupported(config)
        super().__init__(*args, **kwargs)
        self._raise_unsupported(self.args)
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                f"router_aux_loss_coef={self.router_aux_loss_coef!r}: the MoE load-balancing loss is not "
                "computed by the fused path; set GRPOConfig(router_aux_loss_coef=0.0)"
            )
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "DeepSpeed ZeRO-3: the fused loss re-reads lm_head.weight in its backward, after ZeRO-3 has "
                "re-partitioned it; use ZeRO-2 or FSDP2"
            )
        from accelerate.utils import is_peft_model

        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._mgrpo_logit_scale = _logit_scale(base)
        self._fused_impl = fused_impl
        self._fused_chunk_size = fused_chunk_size
        _install_fused_forward(base)

    @staticmethod
    def _raise_unsupported(config: GRPOConfig) -> None:
        problems = unsupported_config_fields(config)
        if problems:
            raise ValueError(
                "FusedGRPOTrainer cannot honor these GRPOConfig fields:\n  - " + "\n  - ".join(problems)
            )

    # ------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        return self._compute_loss(model, inputs)

    def _compute_loss(self, model, inputs):
        """TRL's ``_compute_loss`` with the fused loss: same inputs, same value, same metrics."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        extra = {key: inputs[key] for key in _MULTIMODAL_KEYS if inputs.get(key) is not None}

        # Normalizers: see the module docstring. The fused loss is normalized within this call and
        # multiplied by `scale` here; the entropy bonus's coefficient is converted so that, after that
        # scale, it is TRL's `coef / G` on the entropy's token mean.
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        count = mask.sum().float()
        if self.loss_type in GLOBAL_TOKEN_MEAN_LOSS_TYPES:
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = (
                    normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
                )
            scale = count.clamp(min=1.0) / normalizer.to(count.device)
        else:
            scale = torch.tensor(1.0 / accumulation, device=count.device)
        bonus = getattr(self, "_entropy_bonus_enabled", False)
        coef = self._entropy_coef_to_apply() if bonus else 0.0
        fused_coef = coef / (accumulation * float(scale))

        loss_fn = functools.partial(
            self._fused_policy_loss, inputs=inputs, mask=mask, entropy_coef=fused_coef, bonus=bonus
        )
        with self.accelerator.autocast():
            loss, logp, entropy, metrics = model(
                input_ids=input_ids, attention_mask=attention_mask, **extra, mgrpo_fast_loss=loss_fn
            )
        loss = loss * scale.to(loss.device)
        if bonus:
            # TRL's policy_loss: the policy term before the bonus (and, for the per-sequence
            # normalizers, before the accumulation factor): loss = scale · policy - coef / G · entropy.
            policy = loss.detach() + coef / accumulation * metrics["bonus_entropy"].to(loss.device)
            if self.loss_type not in GLOBAL_TOKEN_MEAN_LOSS_TYPES:
                policy = policy / scale.to(loss.device)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            self._update_entropy_control(mode, metrics)
        self._log_fused_metrics(mode, inputs, mask.to(loss.device), count.to(loss.device), logp, metrics)
        return loss

    def _entropy_coef_to_apply(self) -> float:
        """TRL's gate: the adaptive coefficient acts only once the last step's entropy is at or below
        the target (the first window, with no measurement yet, applies none)."""
        if getattr(self, "use_adaptive_entropy", False):
            return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        return self.entropy_coef

    @torch.no_grad()
    def _update_entropy_control(self, mode, metrics) -> None:
        """TRL's adaptive entropy control (Skywork-OR1): the window's token-mean entropy over all
        processes (over the bonus's tokens) moves the coefficient by ``entropy_coef_delta`` at each
        optimizer step, within ``[entropy_coef_min, entropy_coef_max]``; the same state attributes as
        ``GRPOTrainer`` (so its checkpoint file carries them)."""
        if getattr(self, "use_adaptive_entropy", False) and mode == "train":
            tokens = metrics["bonus_tokens"].float()
            stats = torch.stack([metrics["bonus_entropy"].float() * tokens.clamp(min=1.0), tokens])
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                step = self.args.entropy_coef_delta
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + step, self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - step, self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _fused_policy_loss(self, last_hidden, lm_head, *, inputs, mask, entropy_coef, bonus):
        """Runs inside the model's forward: ``(loss, logp or None, entropy or None, metrics)`` of this
        micro-batch."""
        completion_ids = inputs["completion_ids"]
        width = completion_ids.size(1)
        weight, bias = _full_tensor(lm_head.weight), _full_tensor(lm_head.bias)
        device = weight.device
        # Position p predicts token p + 1: the completion tokens are predicted by the positions
        # just before them (TRL: hidden[:, :-1] against labels[:, 1:], last `width` columns).
        hidden = last_hidden[:, -width - 1 : -1].to(device)
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            hidden = hidden.float()
        elif torch.is_autocast_enabled(device.type):
            # The GEMM operands take the autocast dtype, as TRL's head does; the logits stay fp32 here
            # (TRL's head rounds each logits tile to that dtype), and autograd casts the weight
            # gradient back to the parameter's dtype.
            dtype = torch.get_autocast_dtype(device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with (
            torch.autocast(device.type, enabled=False),
            maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias),
        ):
            return self._fused_loss_on_head(
                hidden, weight, bias, completion_ids.to(device), mask.to(device), inputs, entropy_coef, bonus
            )

    def _fused_loss_on_head(self, hidden, weight, bias, targets, mask, inputs, entropy_coef, bonus):
        device = hidden.device
        temperature = self.temperature / self._mgrpo_logit_scale
        advantages = inputs["advantages"].to(device)
        adv2d = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old = inputs.get("old_per_token_logps")
        old = None if old is None else old.to(device)
        ref = inputs["ref_per_token_logps"].to(device) if self.beta != 0.0 else None
        opsm = self.off_policy_mask_threshold is not None
        has_sampling = "sampling_per_token_logps" in inputs
        need_entropy = self.top_entropy_quantile < 1.0
        # With the entropy mask the bonus averages over the kept tokens only: its own mask, so the
        # log-probs and entropies are taken first (differentiable, still without logits).
        two_stage = bonus and need_entropy
        clip_metrics = self.loss_type in CLIP_LOSS_TYPES or self.loss_type == "cispo"
        need_logp = (old is not None and clip_metrics) or (opsm and has_sampling)
        head = dict(
            bias=bias, temperature=temperature, chunk_size=self._fused_chunk_size, impl=self._fused_impl
        )

        logp = entropy = logp_grad = entropy_grad = None
        if two_stage or need_logp or need_entropy:
            rows = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
            scatter = lambda x: x.new_zeros(mask.numel()).index_copy(0, rows, x).view(mask.shape)  # noqa: E731
            if two_stage:  # differentiable log-probs and entropies: they carry the loss
                lp_rows, ent_rows = linear_logprobs(
                    hidden, weight, targets, return_entropy=True, row_index=rows, **head
                )
                logp_grad, entropy_grad = scatter(lp_rows), scatter(ent_rows)
                logp, entropy = logp_grad.detach(), entropy_grad.detach()
            else:  # per-token values of the current policy for masks and metrics, no gradient
                with torch.no_grad():
                    detached = dict(head, bias=None if bias is None else bias.detach())
                    out = linear_logprobs(
                        hidden.detach(),
                        weight.detach(),
                        targets,
                        return_entropy=need_entropy,
                        row_index=rows,
                        **detached,
                    )
                lp_rows, ent_rows = out if need_entropy else (out, None)
                logp = scatter(lp_rows)
                entropy = None if ent_rows is None else scatter(ent_rows)

        # Non-negative, gradient-free factors of the policy term, folded into the advantages.
        factor = None

        def fold(w: torch.Tensor) -> None:
            nonlocal factor
            w = w.to(device=device, dtype=adv2d.dtype)
            factor = w if factor is None else factor * w

        if opsm:
            current = logp if logp is not None else torch.zeros(mask.shape, device=device)
            sampling = inputs.get("sampling_per_token_logps", old if old is not None else current)
            fold(
                self.get_off_policy_mask(
                    advantages=adv2d,
                    per_token_logps=current,
                    sampling_per_token_logps=sampling.to(device),
                    mask=mask,
                    off_policy_threshold=self.off_policy_mask_threshold,
                )
            )
        entropy_mask = None
        if need_entropy:
            entropy_mask = self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
            fold(entropy_mask)
        loss_advantages = advantages if factor is None else (adv2d * factor).expand(mask.shape)
        # TRL: vespo reads the ratio whenever the batch has one; the others apply it when configured.
        is_ratio = None
        if self.loss_type == "vespo" or (self.use_vllm and self.vllm_importance_sampling_correction):
            is_ratio = inputs.get("importance_sampling_ratio")
            is_ratio = None if is_ratio is None else is_ratio.to(device)

        # TRL's loss reads these attributes at every call (a callback may change them between steps).
        options = trl_loss_options(
            self.loss_type,
            self.epsilon_low,
            self.epsilon_high,
            self.args.delta,
            self.beta,
            self.importance_sampling_level,
            self.max_completion_length,
            self.args,
            entropy_coef=0.0 if two_stage else entropy_coef,
        )
        if not two_stage:
            loss, metrics = fused_linear_grpo_loss(
                hidden,
                weight,
                targets,
                loss_advantages,
                mask,
                old_logp=old,
                ref_logp=ref,
                vllm_is_ratio=is_ratio,
                options=options,
                **head,
            )
            # the bonus's tokens: the loss mask (TRL's effective mask without the entropy mask)
            metrics["bonus_entropy"], metrics["bonus_tokens"] = metrics["entropy"], mask.sum()
            return loss, logp, entropy, metrics

        loss, metrics = grpo_loss(
            logp_grad,
            old,
            ref,
            loss_advantages,
            mask,
            entropy=entropy,
            vllm_is_ratio=is_ratio,
            impl=self._fused_impl,
            options=options,
        )
        kept = (mask * entropy_mask).to(entropy_grad.dtype)
        bonus_entropy = (entropy_grad * kept).sum() / kept.sum().clamp(min=1.0)
        metrics["bonus_entropy"], metrics["bonus_tokens"] = bonus_entropy.detach(), kept.sum()
        return loss - entropy_coef * bonus_entropy, logp, entropy, metrics

    # ------------------------------------------------------------------------------------------
    # metrics (TRL's names and formulas)
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _log_fused_metrics(self, mode, inputs, mask, count, logp, metrics):
        device = mask.device
        advantages = inputs["advantages"].to(device)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)

        def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def global_masked_mean(x: torch.Tensor) -> float:
            if x.shape[1] == 1:  # sequence-level: one value per sequence
                return global_mean(x.sum(), torch.tensor(float(x.shape[0]), device=device))
            return global_mean((x * mask).sum(), mask.sum().float())

        def masked_seq_mean(x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] == 1:
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        # Token means of the fused metrics, back to sums: mean * max(1, M) (0 when M = 0).
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(
                global_mean(metrics["kl"].to(device) * count.clamp(min=1.0), count)
            )
        self._metrics[mode]["entropy"].append(
            global_mean(metrics["entropy"].to(device) * count.clamp(min=1.0), count)
        )
        if self.loss_type == "vespo":  # phi: one value per sequence (per token with (B, T) advantages)
            phi_mean = metrics["vespo/phi_seq_mean"].to(device)
            if advantages.shape[1] == 1:
                sequences = torch.tensor(float(advantages.shape[0]), device=device)
                self._metrics[mode]["vespo/phi_seq_mean"].append(global_mean(phi_mean * sequences, sequences))
            else:
                self._metrics[mode]["vespo/phi_seq_mean"].append(
                    global_mean(phi_mean * count.clamp(min=1.0), count)
                )
        if self.loss_type not in CLIP_LOSS_TYPES and self.loss_type != "cispo":
            return  # sapo and vespo log no clip metrics

        # The importance ratio as TRL forms it: exactly 1 without old log-probs.
        m = mask.to(torch.float32)
        if logp is None or inputs.get("old_per_token_logps") is None:
            log_ratio = torch.zeros(mask.shape, device=device)
        else:
            old = inputs["old_per_token_logps"].to(device)
            log_ratio = torch.where(mask != 0, logp - old, 0.0)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)

        if self.loss_type == "cispo":
            clipped = (coef_1 > self.epsilon_high) & (advantages > 0)
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            return
        if self.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=self.args.delta)
        is_low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
        is_high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
        is_region = ((is_low + is_high) > 0).float()
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(is_low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(is_high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(is_region))
        low_min = nanmin(self.accelerator.gather(masked_seq_mean(is_low)))
        self._metrics[mode]["clip_ratio/low_min"].append(low_min.item())
        high_max = nanmax(self.accelerator.gather(masked_seq_mean(is_high)))
        self._metrics[mode]["clip_ratio/high_max"].append(high_max.item())
